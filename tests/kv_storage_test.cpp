// How kept KV entries are stored, on small hand-checkable cases: quantization error bounds and
// packed forms, tiered ladders, low-rank coordinates, and byte accounting.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <map>
#include <random>

#include "kernels/cpu_ops.h"
#include "kernels/splitmix.h"
#include "kv/budget_select.h"
#include "kv/policy.h"
#include "kv/scorers.h"
#include "runtime/error.h"
#include "ppl_jobs.h"
#include "kv_cases.h"

namespace kvtp::kv {
namespace {

using namespace cases;

// Tiered precision, head_dim 32: an entry costs 132 bytes at fp16, 72 at int8, 28 at 2 bits (its
// form and a 4-byte position). tokens=6 gives 6 x 132 = 792 bytes; the sink and the recent entry
// (protected, fp16) take 264; the 528 left hold the other 8 at 2 bits (224), and the 304 then left
// lift 2 of them to fp16 (104 each) and, with the 96 after that, 2 to int8 (44 each), by H2O's score.
TEST(KvTiered, ALadderFillsTheBudgetTopDownAndNeverPromotes) {
  const int hd = 32;
  KVCache c(1, 1, hd);
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> k(size_t(10) * hd), v(size_t(10) * hd);
  for (auto& x : k) x = d(rng);
  for (auto& x : v) x = d(rng);
  std::vector<int> pos(10);
  std::iota(pos.begin(), pos.end(), 0);
  c.append(0, k.data(), v.data(), pos.data(), 10);
  StepAttention a;
  a.T = 1;
  a.blocks = {{0, .08f, .01f, .07f, .02f, .06f, .03f, .05f, .04f, 0}};
  const auto formsBy = [&](const std::string& spec, const StepAttention& attention) {
    Policy p(parsePolicy(spec, ""), layout(1, hd), nullptr);
    p.afterStep(c, attention, 9, false);
    std::map<int, Form> out;
    for (int i = 0; i < c.head(0, 0).length(); ++i) out[c.head(0, 0).positions[i]] = c.head(0, 0).form[i];
    return out;
  };
  const Form F = Form::Full, I8 = Form::Int8, T2 = Form::Token2;
  EXPECT_EQ(formsBy("h2o:tokens=6,sinks=1,recent=1,ladder=fp16/int8/int2", a),
            (std::map<int, Form>{{0, F}, {1, F}, {2, T2}, {3, F}, {4, T2}, {5, I8}, {6, T2}, {7, I8}, {8, T2}, {9, F}}));
  // Bytes as stored: 4 x 128 + 2 x (64 + 4) + 4 x (16 + 8), and a position each: within 792.
  EXPECT_EQ(c.storedBytes(0, 0), 4 * 128 + 2 * 68 + 4 * 24);
  // Decoded within half a step of each group's range (2 bits: range / 3 / 2).
  std::vector<float> scratch;
  const HeadRows rows = c.rows(0, 0, scratch);
  for (int ch = 0; ch < hd; ++ch) {
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < hd; ++j) lo = std::min(lo, k[2 * hd + j]), hi = std::max(hi, k[2 * hd + j]);
    EXPECT_NEAR(rows.keys[2 * hd + ch], k[2 * hd + ch], (hi - lo) / 3 / 2 + 1e-5) << ch;  // position 2, at 2 bits
  }
  // Some entries decoded alone (a GPU's host-held forms upload only those that changed): rows()' bits.
  const std::vector<int> some = {2, 5, 9};
  std::vector<float> some_k(some.size() * hd), some_v(some.size() * hd);
  c.decodeEntries(0, 0, some, some_k.data(), some_v.data());
  for (size_t j = 0; j < some.size(); ++j)
    for (int ch = 0; ch < hd; ++ch) {
      EXPECT_EQ(some_k[j * hd + ch], rows.keys[some[j] * hd + ch]) << some[j];
      EXPECT_EQ(some_v[j * hd + ch], rows.values[some[j] * hd + ch]) << some[j];
    }
  EXPECT_THROW(c.decodeEntries(0, 0, {5, 2}, some_k.data(), some_v.data()), std::out_of_range);
  // tokens=3: 396 bytes, 264 of them the protected's; the 132 left hold 4 entries at 2 bits and
  // lift none: the 4 highest-ranked stay, stepped down. Then tokens=6 again: the 528 bytes would
  // lift them to fp16, but what stepped down stays down (and what went is gone).
  EXPECT_EQ(formsBy("h2o:tokens=3,sinks=1,recent=1,ladder=fp16/int8/int2", {}),
            (std::map<int, Form>{{0, F}, {1, T2}, {3, T2}, {5, T2}, {7, T2}, {9, F}}));
  EXPECT_EQ(formsBy("h2o:tokens=6,sinks=1,recent=1,ladder=fp16/int8/int2", {}),
            (std::map<int, Form>{{0, F}, {1, T2}, {3, T2}, {5, T2}, {7, T2}, {9, F}}));
}

TEST(KvTiered, LaddersAreParsedStrictly) {
  EXPECT_EQ(parsePolicy("h2o:budget=0.2,ladder=fp16/int4/int2", "").describe(),
            "h2o:budget=0.2,sinks=4,recent=16,scope=global,ladder=fp16/int4/int2");
  EXPECT_EQ(parsePolicy("h2o:budget=0.2,ladder=fp16/int4/kivi2", "").describe(),
            "h2o:budget=0.2,sinks=4,recent=16,scope=global,ladder=fp16/int4/kivi2");
  for (const char* bad : {"h2o:ladder=int8/int4", "h2o:ladder=fp16", "h2o:ladder=fp16/int2/int4", "h2o:ladder=fp16/int3",
                          "simlayerkv:ladder=fp16/int8", "h2o:ladder=fp16/kivi2/int2", "h2o:ladder=fp16/int8/kivi2",
                          "h2o:ladder=fp16/int4/kivi4", "h2o:ladder=fp16/kivi3"})
    EXPECT_THROW(parsePolicy(bad, ""), std::invalid_argument) << bad;
  EXPECT_THROW(parsePolicy("h2o:ladder=fp16/int8", "int8"), std::invalid_argument);
}

// KIVI's rung, head_dim 4, 2 bits, runs of 32: an entry costs 20 bytes at fp16 (16 and its
// position) and 6 + 4 at KIVI (a byte of codes each for key and value, a value (lo, step) pair)
// plus its share of a full run's key pairs, 18 / 32: 10.5625. bytes=600, StreamingLLM (the
// newest first), nothing protected, 40 entries. All fit at KIVI (422.5) and the 177.5 left would
// lift the 18 newest to fp16 (9.4375 each) — but the 22 oldest, ranked KIVI, would wait at fp16
// for a run of 32, holding 22 x 9.4375 = 207.625 beyond KIVI's cost. The budget sets that aside
// and decides again: 392.375 bytes keep 37 entries at KIVI and lift none, so positions 0..2 go,
// 3..34 make a run and 35..39 wait (47.1875 beyond, within what was set aside). Stored: 32 x 6 +
// 18 for the run, 5 x 16 at fp16, 37 positions x 4 = 438, within 600. One more entry: the 6
// newest fit at fp16 and nothing waits (458 bytes).
TEST(KvTiered, KiviRungQuantizesWaitingEntriesInRunsWithinTheBudget) {
  const int hd = 4;
  KVCache c(1, 1, hd);
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> k(size_t(41) * hd), v(k.size());
  for (auto& x : k) x = d(rng);
  for (auto& x : v) x = d(rng);
  std::vector<int> pos(41);
  std::iota(pos.begin(), pos.end(), 0);
  Policy p(parsePolicy("streamingllm:bytes=600,sinks=0,recent=0,ladder=fp16/kivi2", ""), layout(1, hd), nullptr);
  c.append(0, k.data(), v.data(), pos.data(), 40);
  p.afterStep(c, {}, 39, false);
  const HeadCache& h = c.head(0, 0);
  ASSERT_EQ(h.length(), 37);
  EXPECT_EQ(h.positions.front(), 3);
  for (int i = 0; i < 37; ++i) EXPECT_EQ(h.form[i], i < 32 ? Form::Kivi : Form::Full) << i;
  EXPECT_EQ(h.group_rows, (std::vector<uint16_t>{32}));
  EXPECT_EQ(p.bytes(c, 40).stored, 438);
  // Keys per channel over the run, values per token: within half a 2-bit step of their ranges.
  std::vector<float> scratch;
  const HeadRows rows = c.rows(0, 0, scratch);
  for (int ch = 0; ch < hd; ++ch) {
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 3; t < 35; ++t) lo = std::min(lo, k[t * hd + ch]), hi = std::max(hi, k[t * hd + ch]);
    for (int i = 0; i < 32; ++i) EXPECT_NEAR(rows.keys[i * hd + ch], k[(i + 3) * hd + ch], (hi - lo) / 3 / 2 + 1e-5);
  }
  c.append(0, k.data() + 40 * hd, v.data() + 40 * hd, &pos[40], 1);
  p.afterStep(c, {}, 40, false);
  ASSERT_EQ(h.length(), 38);
  EXPECT_EQ(std::count(h.form.begin(), h.form.end(), Form::Kivi), 32);
  EXPECT_EQ(p.bytes(c, 41).stored, 458);
  // A budget for every entry at fp16 promotes nothing: the run stays KIVI.
  Policy roomy(parsePolicy("streamingllm:bytes=100000,sinks=0,recent=0,ladder=fp16/kivi2", ""), layout(1, hd), nullptr);
  roomy.afterStep(c, {}, 40, false);
  EXPECT_EQ(std::count(h.form.begin(), h.form.end(), Form::Kivi), 32);
}

// With KIVI's rung the bytes held jump with how many entries wait for a run; the decision sets
// that aside until it holds, so a byte budget is never exceeded — here 151 fp16 entries' worth
// (151 x 132 bytes) over two heads of head_dim 32 through 400 steps of H2O on random attention.
TEST(KvTiered, AKiviLadderHoldsWithinItsBudgetAtEveryStep) {
  const int hd = 32, H = 2, budget = 151 * 132;
  KVCache c(1, H, hd);
  Policy p(parsePolicy("h2o:bytes=" + std::to_string(budget) + ",ladder=fp16/kivi2", ""), layout(H, hd), nullptr);
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  int64_t most = 0;
  for (int t = 0; t < 400; ++t) {
    std::vector<float> k(size_t(H) * hd), v(k.size());
    for (auto& x : k) x = d(rng);
    for (auto& x : v) x = d(rng);
    c.append(0, k.data(), v.data(), &t, 1);
    StepAttention a;
    a.T = 1;
    for (int h = 0; h < H; ++h) {
      std::vector<float> w(static_cast<size_t>(c.head(0, h).length()));
      for (auto& x : w) x = std::pow(u(rng), 4.0f);  // a few entries draw most of it
      a.blocks.push_back(w);
    }
    p.afterStep(c, a, t, false);
    most = std::max(most, p.bytes(c, t + 1).stored);
    ASSERT_LE(p.bytes(c, t + 1).stored, budget) << "step " << t;
  }
  EXPECT_GT(std::count(c.head(0, 0).form.begin(), c.head(0, 0).form.end(), Form::Kivi), 0);
  EXPECT_GT(most, budget * 9 / 10);  // and it uses the budget
}

TEST(KvQuant, ErrorsStayWithinTheAnalyticBounds) {
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 2.0f);
  for (int bits : {2, 4}) {
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<float> x(32);
      for (auto& v : x) v = d(rng);
      const Affine a = fitAffine(x.data(), 32, 1, bits);
      const float lo = *std::min_element(x.begin(), x.end()), hi = *std::max_element(x.begin(), x.end());
      const float bound = (hi - lo) / float((1 << bits) - 1) / 2.0f;
      for (int i = 0; i < 32; ++i) ASSERT_LE(std::abs(a.decode(encodeAffine(x[i], a, bits)) - x[i]), bound * 1.0001f) << bits << " bits";
    }
  }
  std::vector<float> x(64);
  for (auto& v : x) v = d(rng);
  const float step = fitInt8(x.data(), 64);
  float mx = 0;
  for (float v : x) mx = std::max(mx, std::abs(v));
  int exact = 0;
  for (int i = 0; i < 64; ++i) {
    const float back = float(encodeInt8(x[i], step)) * step;
    EXPECT_LE(std::abs(back - x[i]), mx / 127.0f / 2.0f * 1.0001f);
    exact += back == x[i];
  }
  EXPECT_LT(exact, 64);
}

// Random keys and values in a 1-layer, 1-head cache of n entries.
KVCache randomCache(int n, int hd, std::vector<float>* k, std::vector<float>* v) {
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  KVCache c(1, 1, hd);
  k->resize(size_t(n) * hd), v->resize(size_t(n) * hd);
  for (auto& x : *k) x = d(rng);
  for (auto& x : *v) x = d(rng);
  std::vector<int> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = i;
  c.append(0, k->data(), v->data(), pos.data(), n);
  return c;
}

TEST(KvQuant, KiviIsStoredPackedAndDecodesWithinTheBound) {
  const int hd = 16, n = 12, bits = 2, group = 4;
  std::vector<float> k, v, scratch;
  KVCache c = randomCache(n, hd, &k, &v);
  c.quantizeKivi(0, 0, {{0, 1, 2, 3}, {4, 5, 6, 7}}, bits, group);  // two key groups, 8..11 full
  const HeadCache& h = c.head(0, 0);
  EXPECT_EQ(h.codes.size(), size_t(8 * 2 * hd * bits / 8));  // 2 bits a number, nothing else
  EXPECT_EQ(h.keys.size(), size_t(4 * hd));                   // only the full entries keep floats
  EXPECT_EQ(h.group_rows, (std::vector<uint16_t>{4, 4}));
  const HeadRows rows = c.rows(0, 0, scratch);
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < hd; ++ch) {
      // Keys: per channel over the entry's group; values: per token over `group` channels.
      float klo = 1e30f, khi = -1e30f, vlo = 1e30f, vhi = -1e30f;
      for (int j = i / group * group; j < i / group * group + group; ++j)
        klo = std::min(klo, k[j * hd + ch]), khi = std::max(khi, k[j * hd + ch]);
      for (int cc = ch / group * group; cc < ch / group * group + group; ++cc)
        vlo = std::min(vlo, v[i * hd + cc]), vhi = std::max(vhi, v[i * hd + cc]);
      const float kb = i < 8 ? (khi - klo) / 3 / 2 * 1.0001f : 0, vb = i < 8 ? (vhi - vlo) / 3 / 2 * 1.0001f : 0;
      ASSERT_LE(std::abs(rows.keys[i * hd + ch] - k[i * hd + ch]), kb) << i << " " << ch;
      ASSERT_LE(std::abs(rows.values[i * hd + ch] - v[i * hd + ch]), vb) << i << " " << ch;
    }
  // Evicting into a group keeps its parameters for the entries left, and drops an emptied group.
  const std::vector<float> before(rows.keys, rows.keys + 2 * n * hd);
  c.retain(0, 0, {1, 2, 9, 10});  // the first group thinned, the second emptied, two full entries
  EXPECT_EQ(c.head(0, 0).group_rows, (std::vector<uint16_t>{2}));
  EXPECT_EQ(c.head(0, 0).key_params.size(), size_t(2 * hd));
  const HeadRows kept = c.rows(0, 0, scratch);
  const int from[] = {1, 2, 9, 10};
  for (int i = 0; i < 4; ++i)
    for (int ch = 0; ch < hd; ++ch) {
      ASSERT_EQ(kept.keys[i * hd + ch], before[from[i] * hd + ch]);
      ASSERT_EQ(kept.values[i * hd + ch], before[n * hd + from[i] * hd + ch]);
    }
}

TEST(KvQuant, Int8IsStoredAsBytes) {
  const int hd = 8, n = 5;
  std::vector<float> k, v, scratch;
  KVCache c = randomCache(n, hd, &k, &v);
  c.quantizeInt8(0, 0);
  EXPECT_EQ(c.head(0, 0).codes.size(), size_t(n * 2 * hd));
  EXPECT_TRUE(c.head(0, 0).keys.empty());
  const HeadRows rows = c.rows(0, 0, scratch);
  for (int i = 0; i < n; ++i) {
    float mk = 0, mv = 0;
    for (int ch = 0; ch < hd; ++ch) mk = std::max(mk, std::abs(k[i * hd + ch])), mv = std::max(mv, std::abs(v[i * hd + ch]));
    for (int ch = 0; ch < hd; ++ch) {
      ASSERT_LE(std::abs(rows.keys[i * hd + ch] - k[i * hd + ch]), mk / 127 / 2 * 1.0001f);
      ASSERT_LE(std::abs(rows.values[i * hd + ch] - v[i * hd + ch]), mv / 127 / 2 * 1.0001f);
    }
  }
}

TEST(KvBytes, EqualAHandCount) {
  const int hd = 8;
  // int8: 10 tokens x (key + value) x (8 codes + 2-byte scale) = 200; full fp16 = 10 x 2 x 8 x 2 = 320.
  KVCache a = filled(10, 1, hd);
  Policy int8(parsePolicy("", "int8"), layout(1, hd), nullptr);
  int8.afterStep(a, {}, 9, false);
  EXPECT_EQ(int8.bytes(a, 10).stored, 200);
  EXPECT_EQ(int8.bytes(a, 10).full, 320);
  // KIVI 2-bit, group 4, residual 2: entries 0..7 quantized (two groups of 4), 8 and 9 in fp16.
  // Quantized entry: codes 2 x 2 bytes + value scale/zero 4 x 2 channel groups = 12; per key
  // group: scale/zero per channel 4 x 8 + its 2-byte entry count = 34.
  KVCache b = filled(10, 1, hd);
  Policy kivi(parsePolicy("", "kivi:bits=2,group=4,residual=2"), layout(1, hd), nullptr);
  kivi.afterStep(b, {}, 9, false);
  EXPECT_EQ(kivi.bytes(b, 10).stored, 8 * 12 + 2 * 34 + 2 * 32);
  // Eviction adds a 4-byte position per kept entry: 6 kept x (32 + 4).
  KVCache c = filled(10, 1, hd);
  Policy h2o(parsePolicy("streamingllm:tokens=6,sinks=1,recent=1", ""), layout(1, hd), nullptr);
  h2o.afterStep(c, {}, 9, false);
  EXPECT_EQ(h2o.bytes(c, 10).stored, 6 * 36);
}

TEST(KvLowRank, LeadingEigenvectorsAreOrthonormalAndOrdered) {
  std::mt19937 rng(5);
  std::normal_distribution<float> d;
  const int n = 12, cols = 40, r = 5;
  std::vector<float> W(n * cols);
  for (auto& w : W) w = d(rng);
  const auto B = leftSingularBasis(W.data(), n, cols, r);
  for (int a = 0; a < r; ++a)
    for (int b = 0; b < r; ++b) {
      double dot = 0;
      for (int i = 0; i < n; ++i) dot += double(B[i * r + a]) * B[i * r + b];
      EXPECT_NEAR(dot, a == b ? 1.0 : 0.0, 1e-5);
    }
  // Rayleigh quotients ||W^T b_k||^2 descend: the leading directions come first.
  double last = 1e300;
  for (int k = 0; k < r; ++k) {
    double q = 0;
    for (int c = 0; c < cols; ++c) {
      double s = 0;
      for (int i = 0; i < n; ++i) s += double(W[i * cols + c]) * B[i * r + k];
      q += s * s;
    }
    EXPECT_LT(q, last * (1 + 1e-9));
    last = q;
  }
  // A vector in the span of W's rows' leading directions survives projection; at full rank all do.
  const auto full = leftSingularBasis(W.data(), n, cols, n);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  auto y = x;
  projectOnto(y.data(), full.data(), n, n);
  for (int i = 0; i < n; ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

TEST(KvLowRank, BytesCountTheCoordinates) {
  const int hd = 8;
  KVCache c = filled(10, 1, hd);
  LowRankBases b;
  b.rank = 3;
  std::vector<float> W(hd * 20, 0.0f);
  for (int i = 0; i < hd; ++i) W[i * 20 + i] = float(hd - i);
  b.keys = b.values = {leftSingularBasis(W.data(), hd, 20, 3)};
  Policy p(parsePolicy("", "", "cskv:rank=3,window=4"), layout(1, hd), nullptr);
  c.setLowRank(b);
  p.afterStep(c, {}, 9, false);
  // 6 old entries as 3 fp16 coordinates for key and value, 4 recent at full width.
  EXPECT_EQ(p.bytes(c, 10).stored, 6 * 2 * 3 * 2 + 4 * 2 * hd * 2);
  EXPECT_EQ(c.head(0, 0).coords.size(), size_t(6 * 2 * 3));
  // Basis = the first 3 channels: old values keep channels 0..2 and lose the rest.
  std::vector<float> scratch;
  const HeadRows rows = c.rows(0, 0, scratch);
  EXPECT_EQ(rows.values[5 * hd + 2], -5.0f);
  EXPECT_EQ(rows.values[5 * hd + 3], 0.0f);
  EXPECT_EQ(rows.values[9 * hd + 3], -9.0f);
}

// With int8 a row is held as codes from its step on; once older than the window it becomes the
// coordinates of its decoded codes (not stays int8: low rank + int8 holds less than either alone).
TEST(KvLowRank, Int8RowsBecomeCoordinatesPastTheWindow) {
  const int hd = 8, rank = 3;
  KVCache c(1, 1, hd);
  LowRankBases b;
  b.rank = rank;
  std::vector<float> W(hd * 20, 0.0f);
  for (int i = 0; i < hd; ++i) W[i * 20 + i] = float(hd - i);
  b.keys = b.values = {leftSingularBasis(W.data(), hd, 20, rank)};  // the first 3 channels
  c.setLowRank(b);
  Policy p(parsePolicy("", "int8", "cskv:rank=3,window=4"), layout(1, hd), nullptr);
  auto row = [&](int t, float sign) {
    std::vector<float> x(hd);
    for (int ch = 0; ch < hd; ++ch) x[ch] = sign * (float(t) + 0.1f * float(ch) + 0.013f);
    return x;
  };
  for (int t = 0; t < 11; ++t) {
    const std::vector<float> k = row(t, 1.0f), v = row(t, -1.0f);
    c.append(0, k.data(), v.data(), &t, 1);
    if (t >= 9) p.afterStep(c, {}, t, t == 9);  // a prompt of 10, then one decode step
  }
  const HeadCache& h = c.head(0, 0);
  for (int i = 0; i < 11; ++i) EXPECT_EQ(h.form[i], i < 7 ? Form::LowRank : Form::Int8) << i;
  EXPECT_EQ(p.bytes(c, 11).stored, 7 * 2 * rank * 2 + 4 * (2 * hd + 4));
  // Entry 6 left the window in the decode step, as codes: its coordinates are its decoded codes'.
  const std::vector<float> v6 = row(6, -1.0f);
  const float step = fitInt8(v6.data(), hd);
  std::vector<float> scratch;
  const HeadRows rows = c.rows(0, 0, scratch);
  bool coded = false;
  for (int ch = 0; ch < rank; ++ch) {
    const float decoded = float(encodeInt8(v6[ch], step)) * step;
    EXPECT_NEAR(rows.values[6 * hd + ch], decoded, 1e-6f) << ch;
    coded |= std::abs(decoded - v6[ch]) > 1e-4f;
  }
  EXPECT_TRUE(coded) << "the test's rows should lose something to int8";
  EXPECT_EQ(rows.values[6 * hd + rank], 0.0f);
}

TEST(KvLowRank, FullRankReproducesTheFullCache) {
  PplJob j = test::fixtureJob("llama3-gqa", Mode::Decode);  // head_dim 8, RoPE with llama3 scaling
  const auto full = runPplJob(j).result;
  j.kv_lowrank = "cskv:rank=8,window=4";
  const auto same = runPplJob(j).result;
  j.kv_lowrank = "cskv:rank=3,window=4";
  const auto low = runPplJob(j).result;
  for (size_t s = 0; s < full.sequences.size(); ++s)
    for (size_t i = 0; i < full.sequences[s].logprobs.size(); ++i)
      ASSERT_NEAR(same.sequences[s].logprobs[i], full.sequences[s].logprobs[i], 1e-4);  // un-rotate/rotate rounding
  EXPECT_GT(std::abs(low.ppl() - full.ppl()), 1e-3 * full.ppl());
}

TEST(KvLowRank, RankPastHeadDimIsRefused) {
  PplJob j = test::fixtureJob("llama3-gqa", Mode::Decode);  // head_dim 8
  j.kv_lowrank = "cskv:rank=9,window=4";
  try {
    runPplJob(j);
    ADD_FAILURE() << "expected an error";
  } catch (const kvtp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cskv rank 9 exceeds head_dim 8"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvtp::kv
