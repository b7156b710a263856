// KV eviction on small hand-checkable cases: which tokens each method keeps and why (each
// method's paper worked by hand). The budget itself (scopes, select, 100 %): kv_budget_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <map>
#include <random>

#include "kernels/cpu_ops.h"
#include "kernels/splitmix.h"
#include "kv/policy.h"
#include "kv/scorers.h"
#include "kv_cases.h"

namespace kvtp::kv {
namespace {

using namespace cases;

TEST(KvSpec, ParsesTheGrammarAndRejectsTypos) {
  const auto s = parsePolicy("h2o:budget=0.25,recent=8,sinks=2,scope=layer", "kivi:bits=4,group=16,residual=32");
  EXPECT_EQ(s.method, Method::H2O);
  EXPECT_DOUBLE_EQ(s.budget, 0.25);
  EXPECT_EQ(s.recent, 8);
  EXPECT_EQ(s.scope, Scope::Layer);
  EXPECT_EQ(s.quant, Quant::Kivi);
  EXPECT_EQ(s.bits, 4);
  EXPECT_THROW(parsePolicy("h2o:budgt=0.2", ""), std::invalid_argument);
  EXPECT_THROW(parsePolicy("h2o:budget=1.5", ""), std::invalid_argument);
  EXPECT_THROW(parsePolicy("lru", ""), std::invalid_argument);
  EXPECT_THROW(parsePolicy("", "kivi:bits=3"), std::invalid_argument);
  EXPECT_THROW(parsePolicy("h2o:budget=abc", ""), std::invalid_argument);
  EXPECT_THROW(parsePolicy("h2o:budget=0.2,decode=slide", ""), std::invalid_argument);  // SCOPE needs a prompt method
}

TEST(KvEviction, StreamingLlmKeepsSinksAndTheMostRecent) {
  KVCache c = filled(20);
  Policy p(parsePolicy("streamingllm:tokens=8,sinks=2,recent=3", ""), layout(), nullptr);
  p.afterStep(c, {}, 19, false);
  // 8 kept: sinks 0, 1; then the 6 most recent (3 protected + 3 by recency).
  EXPECT_EQ(positions(c), (std::vector<int>{0, 1, 14, 15, 16, 17, 18, 19}));
  EXPECT_EQ(c.head(0, 0).keys[2 * 2], 14.0f);  // keys moved with their positions
  EXPECT_EQ(c.head(0, 0).values[7 * 2 + 1], -19.0f);
}

// The CUDA engine's host mirror (rows on the device) gets the same decisions and byte counts.
TEST(KvEviction, AMirrorOfDeviceRowsTakesTheSameDecisions) {
  const int hd = 8;
  KVCache real = filled(20, 2, hd), mirror(1, 2, hd, /*rows_on_device=*/true);
  for (int t = 0; t < 20; ++t) mirror.append(0, nullptr, nullptr, &t, 1);
  const auto spec = parsePolicy("streamingllm:tokens=8,sinks=2,recent=3", "");
  Policy a(spec, layout(2, hd), nullptr), b(spec, layout(2, hd), nullptr);
  a.afterStep(real, {}, 19, false);
  b.afterStep(mirror, {}, 19, false);
  for (int h = 0; h < 2; ++h) EXPECT_EQ(positions(mirror, h), positions(real, h));
  EXPECT_EQ(b.bytes(mirror, 20).stored, a.bytes(real, 20).stored);
  EXPECT_TRUE(mirror.head(0, 0).keys.empty());
  // int8 (the device quantizes its rows): the mirror records the form and counts the same bytes.
  for (int h = 0; h < 2; ++h) real.quantizeInt8(0, h), mirror.quantizeInt8(0, h);
  EXPECT_EQ(mirror.head(0, 1).form.front(), Form::Int8);
  EXPECT_EQ(b.bytes(mirror, 20).stored, a.bytes(real, 20).stored);
  EXPECT_LT(b.bytes(mirror, 20).stored, b.bytes(mirror, 20).full * 3 / 4);
  EXPECT_THROW(mirror.quantizeKivi(0, 0, {{0, 1}}, 2, 2), std::logic_error);  // not on the device (yet)
}

// The methods a device does not score decide on its mirror from the rows (and the step's
// queries) copied down: a mirror holding a cache's rows keeps what the cache itself keeps, step
// after step (the rows held go with any change to the head: a stale copy is never read).
TEST(KvEviction, AMirrorHoldingTheRowsDecidesAsTheCacheDoes) {
  const int hd = 8, H = 2, prompt = 24, steps = 6;
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, 1.0f);
  auto random = [&](size_t n) {
    std::vector<float> x(n);
    for (auto& v : x) v = d(rng);
    return x;
  };
  const std::vector<float> inv_freq = {1.0f, 0.1f, 0.01f, 0.001f};
  for (const char* kv : {"leverage:tokens=10,sinks=2,recent=2", "expected:tokens=10,sinks=2,recent=2",
                         "noncausal:tokens=10,sinks=2,recent=2,span=8", "compactor:tokens=10,sinks=2,recent=2,span=8",
                         "keydiff:tokens=10,sinks=2,recent=2,block=6"}) {
    const PolicySpec spec = parsePolicy(kv, "");
    KVCache real(1, H, hd), mirror(1, H, hd, /*rows_on_device=*/true);
    real.setRope(inv_freq), mirror.setRope(inv_freq);
    Policy a(spec, layout(H, hd), nullptr), b(spec, layout(H, hd), nullptr);
    int pos = 0;
    for (int step = 0; step <= steps; ++step) {
      const int T = step == 0 ? prompt : 1;
      std::vector<int> at(T);
      std::iota(at.begin(), at.end(), pos);
      const auto k = random(size_t(T) * H * hd), v = random(k.size());
      real.append(0, k.data(), v.data(), at.data(), T);
      mirror.append(0, nullptr, nullptr, at.data(), T);
      StepAttention attn;  // each head's one query head: T rows
      attn.T = T, attn.want_probabilities = false, attn.want_queries = true;
      for (int h = 0; h < H; ++h) attn.queries.push_back(random(size_t(T) * hd));
      std::vector<float> scratch;
      for (int h = 0; h < H; ++h) {
        const HeadRows rows = real.rows(0, h, scratch);
        mirror.holdRows(0, h, rows.keys, rows.values);
      }
      pos += T;
      a.afterStep(real, attn, pos - 1, step == 0);
      b.afterStep(mirror, attn, pos - 1, step == 0);
      for (int h = 0; h < H; ++h) ASSERT_EQ(positions(mirror, h), positions(real, h)) << kv << ", step " << step;
    }
    EXPECT_LT(positions(real, 0).size(), size_t(prompt)) << kv << ": it evicted";
    mirror.append(0, nullptr, nullptr, &pos, 1);
    std::vector<float> scratch;
    EXPECT_THROW(mirror.rows(0, 0, scratch), std::logic_error) << kv << ": the rows held went with the append";
  }
  KVCache host = filled(4);
  EXPECT_THROW(host.holdRows(0, 0, nullptr, nullptr), std::logic_error);
}

TEST(KvEviction, AByteBudgetCountsFullPrecisionEntries) {
  const int hd = 8;
  KVCache c = filled(20, 2, hd);  // 2 heads; an entry is 2 x 8 x 2 + 4 = 36 bytes
  Policy p(parsePolicy("streamingllm:bytes=360,sinks=1,recent=1", ""), layout(2, hd), nullptr);
  p.afterStep(c, {}, 19, false);
  EXPECT_EQ(c.head(0, 0).length() + c.head(0, 1).length(), 10);  // 360 / 36
  EXPECT_LE(p.bytes(c, 20).stored, 360);
}

TEST(KvEviction, H2oKeepsTheHeavyHitters) {
  KVCache c = filled(20);
  Policy p(parsePolicy("h2o:tokens=6,sinks=2,recent=2", ""), layout(), nullptr);
  p.afterStep(c, attentionTo({{5, 9}}, 20), 19, false);
  // sinks 0, 1 + recent 18, 19 + the two tokens attention went to.
  EXPECT_EQ(positions(c), (std::vector<int>{0, 1, 5, 9, 18, 19}));
}

TEST(KvEviction, ScissorhandsKeepsTokensPersistentlyImportant) {
  KVCache c = filled(12);
  Policy p(parsePolicy("scissorhands:tokens=5,sinks=1,recent=1,history=8", ""), layout(), nullptr);
  // Token 4 is above average in all 3 steps, token 7 in one: 4 persists, 7 does not outrank it.
  StepAttention a1 = attentionTo({{4, 7}}, 12), a2 = attentionTo({{4}}, 12);
  Policy warm(parsePolicy("scissorhands:budget=1,sinks=1,recent=1,history=8", ""), layout(), nullptr);
  warm.afterStep(c, a1, 11, false);
  warm.afterStep(c, a2, 11, false);
  warm.afterStep(c, a2, 11, false);
  p.afterStep(c, {}, 11, false);
  const auto kept = positions(c);
  EXPECT_EQ(kept.size(), 5u);
  EXPECT_NE(std::find(kept.begin(), kept.end(), 4), kept.end());
  EXPECT_EQ(kept.front(), 0);
  EXPECT_EQ(kept.back(), 11);
}

TEST(KvEviction, SnapKvPoolsTheObservationWindowOnceAtPrefillEnd) {
  KVCache c = filled(16);
  Policy p(parsePolicy("snapkv:tokens=6,sinks=1,recent=2,window=2,kernel=3", ""), layout(), nullptr);
  // Prefill of 16 queries; only the last 2 observe. They attend to token 8.
  StepAttention a;
  a.T = 16;
  a.blocks.assign(1, std::vector<float>(16 * 16, 0.0f));
  for (int t = 14; t < 16; ++t) a.blocks[0][size_t(t) * 16 + 8] = 1.0f;
  for (int t = 0; t < 14; ++t) a.blocks[0][size_t(t) * 16 + 3] = 1.0f;  // outside the window: ignored
  p.afterStep(c, a, 15, true);
  // Max-pooling spreads token 8's score to 7 and 9: sink 0 + 7, 8, 9 + recent 14, 15.
  EXPECT_EQ(positions(c), (std::vector<int>{0, 7, 8, 9, 14, 15}));
  p.afterStep(c, attentionTo({{0}}, 6), 16, false);  // decode: SnapKV does not evict again
  EXPECT_EQ(c.head(0, 0).length(), 6);
}

// One decode query attending (by position) to `hot`, the rest of the cache sharing the remainder.
StepAttention attentionToPositions(const KVCache& c, const std::vector<int>& hot) {
  const auto& pos = c.head(0, 0).positions;
  std::vector<int> idx;
  for (int i = 0; i < int(pos.size()); ++i)
    if (std::find(hot.begin(), hot.end(), pos[i]) != hot.end()) idx.push_back(i);
  return attentionTo({idx}, int(pos.size()));
}

// A prompt of n queries, each attending to every entry with weight w.
StepAttention uniformPrompt(int n, float w) {
  StepAttention a;
  a.T = n;
  a.blocks.assign(1, std::vector<float>(size_t(n) * n, w));
  return a;
}

void appendToken(KVCache& c, int pos) {
  std::vector<float> k(2, float(pos)), v(2, float(-pos));
  c.append(0, k.data(), v.data(), &pos, 1);
}

TEST(KvEviction, ScopeSlideKeepsThePromptAndTheDecodedHeavyHitters) {
  KVCache c = filled(10);
  Policy p(parsePolicy("snapkv:budget=1,decode=slide,decode_budget=4,decode_recent=2", ""), layout(), nullptr);
  p.afterStep(c, uniformPrompt(10, 0.01f), 9, true);  // budget 1: the prompt stays whole
  for (int pos = 10; pos < 18; ++pos) {
    appendToken(c, pos);
    p.afterStep(c, attentionToPositions(c, {12, 14}), pos, false);
  }
  // Prompt 0..9 untouched; of the decoded tokens, the 2 newest and the 2 attended ones.
  std::vector<int> want = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 16, 17};
  EXPECT_EQ(positions(c), want);
}

TEST(KvEviction, ScopeDiscontinuousCompressesEveryDeltaSteps) {
  KVCache c = filled(4);
  Policy p(parsePolicy("snapkv:budget=1,decode=discontinuous,decode_recent=1,delta=3", ""), layout(), nullptr);
  p.afterStep(c, uniformPrompt(4, 0.1f), 3, true);
  std::vector<int> lengths;
  for (int pos = 4; pos < 13; ++pos) {
    appendToken(c, pos);
    p.afterStep(c, attentionToPositions(c, {}), pos, false);
    lengths.push_back(c.head(0, 0).length() - 4);  // decoded entries held
  }
  // Steps 1..9: the cache grows, except at steps 3, 6, 9 where it is cut to 1 + step / 3.
  EXPECT_EQ(lengths, (std::vector<int>{1, 2, 2, 3, 4, 3, 4, 5, 4}));
}

// Random, the control: the budget is kept (protected first), the rest are the entries with the
// highest draws of kernels::entryDraw, the draws depend on the seed only, not on the run.
TEST(KvEviction, RandomKeepsTheHighestDrawsOfItsSeed) {
  const auto keptBy = [](const std::string& spec) {
    KVCache c = filled(40, 2);
    Policy p(parsePolicy(spec, ""), layout(2), nullptr);
    p.afterStep(c, {}, 39, false);
    return std::vector<std::vector<int>>{positions(c, 0), positions(c, 1)};
  };
  const auto a = keptBy("random:tokens=10,sinks=1,recent=2,seed=3");
  EXPECT_EQ(a[0].size() + a[1].size(), 20u);
  std::vector<std::pair<double, int>> free;  // (draw, head * 100 + position) of the unprotected
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(a[h].front(), 0);  // the sink
    EXPECT_EQ(a[h].back(), 39);  // the recent window
    for (int pos = 1; pos < 38; ++pos) free.push_back({kernels::entryDraw(3, 0, h, pos), h * 100 + pos});
  }
  std::sort(free.rbegin(), free.rend());
  std::vector<int> want, got;
  for (int k = 0; k < 20 - 6; ++k) want.push_back(free[k].second);  // 6 protected: 1 sink + 2 recent a head
  for (int h = 0; h < 2; ++h)
    for (int pos : a[h])
      if (pos > 0 && pos < 38) got.push_back(h * 100 + pos);
  std::sort(want.begin(), want.end());
  EXPECT_EQ(got, want);
  EXPECT_EQ(keptBy("random:tokens=10,sinks=1,recent=2,seed=3"), a);  // the same draw again
  EXPECT_NE(keptBy("random:tokens=10,sinks=1,recent=2,seed=4"), a);  // another seed, another draw
  EXPECT_THROW(parsePolicy("random:seed=-1", ""), std::invalid_argument);
}

// One head of head_dim 2 holding `keys` (values equal to the keys), positions 0, 1, ...
KVCache withKeys(const std::vector<std::array<float, 2>>& keys) {
  KVCache c(1, 1, 2);
  for (int t = 0; t < int(keys.size()); ++t) c.append(0, keys[t].data(), keys[t].data(), &t, 1);
  return c;
}

// K-norm keeps the keys of lowest L2 norm (besides the protected).
TEST(KvEviction, KnormKeepsTheLowNormKeys) {
  KVCache c = withKeys({{5, 0}, {1, 0}, {4, 0}, {0.5f, 0}, {3, 0}, {2, 0}, {0, 6}, {0.1f, 0}, {7, 0}, {8, 0}});
  Policy p(parsePolicy("knorm:tokens=5,sinks=1,recent=1", ""), layout(), nullptr);
  p.afterStep(c, {}, 9, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 1, 3, 7, 9}));  // sink, recent, norms 1, 0.5, 0.1
}

// Q-Filters' calibration, worked by hand on a KV head of two query heads (head_dim 2). Head 0's
// queries (3,0) (2,0) (-1,0) (1,0) (0,1): Q^T Q = diag(15, 1), direction +-(1,0), 3 of 5 project
// positively on (1,0): (1,0). Head 1's (0,-2) (0,-3) (0,1) (0.5,0): diag(0.25, 14), direction
// +-(0,1), 3 of 4 positive on (0,-1): (0,-1). The filter is their mean, (0.5, -0.5); keys score
// k . filter: 0.5, -0.5, 1.5, -0.5, 0.75 for entries 1..5, so the two free slots go to 3 and 5.
TEST(KvEviction, QFiltersKeepTheKeysAlongTheQueriesMainDirection) {
  QueryFilterCalibration cal(2, 2);
  const std::vector<float> q0 = {3, 0, 2, 0, -1, 0, 1, 0, 0, 1}, q1 = {0, -2, 0, -3, 0, 1, 0.5f, 0};
  cal.addGram(0, q0.data(), 5), cal.addGram(1, q1.data(), 4);
  cal.addSigns(0, q0.data(), 5), cal.addSigns(1, q1.data(), 4);
  const std::vector<float> filter = cal.filter();
  ASSERT_EQ(filter.size(), 2u);
  EXPECT_NEAR(filter[0], 0.5, 1e-6);
  EXPECT_NEAR(filter[1], -0.5, 1e-6);

  KVCache c = withKeys({{9, 9}, {1, 0}, {0, 1}, {2, -1}, {-1, 0}, {1, -0.5f}, {0, 0}});
  Policy p(parsePolicy("qfilters:tokens=4,sinks=1,recent=1", ""), layout(), nullptr);
  EXPECT_THROW(p.afterStep(c, {}, 6, false), std::logic_error);  // no filters given
  p.setQueryFilters({{0.5f, -0.5f}});
  p.afterStep(c, {}, 6, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 3, 5, 6}));
  EXPECT_THROW(p.setQueryFilters({{1, 0, 0}}), std::invalid_argument);  // not head_dim values
  EXPECT_THROW(parsePolicy("knorm:budget=0.5,filters=x.json", ""), std::invalid_argument);
}

// DMS-style (evict_below): entries scoring below the threshold go whatever the budget — here
// K-norm's -||k|| below -2.5, norms 4, 3, 6, 7; with a budget too, the budget decides first.
TEST(KvEviction, EntriesBelowTheThresholdGoWhateverTheBudget) {
  const std::vector<std::array<float, 2>> keys = {{5, 0}, {1, 0}, {4, 0}, {0.5f, 0}, {3, 0},
                                                  {2, 0}, {6, 0}, {0.1f, 0}, {7, 0}, {8, 0}};
  KVCache c = withKeys(keys);
  Policy p(parsePolicy("knorm:budget=1,sinks=1,recent=1,evict_below=-2.5", ""), layout(), nullptr);
  p.afterStep(c, {}, 9, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 1, 3, 5, 7, 9}));  // the sink and the recent stay
  KVCache d = withKeys(keys);
  Policy q(parsePolicy("knorm:tokens=4,sinks=1,recent=1,evict_below=-2.5", ""), layout(), nullptr);
  q.afterStep(d, {}, 9, false);
  EXPECT_EQ(positions(d), (std::vector<int>{0, 3, 7, 9}));
}

// KeyDiff: normalized keys (1,0) (1,0) (0,1) (0.995,0.0995) (-1,0) (1,0) average to
// a = (0.4992, 0.1833); cosines with a are 0.939, 0.345, 0.968, -0.939 for entries 1..4, so the two
// free slots go to the least similar: 4 (-0.939) and 2 (0.345).
TEST(KvEviction, KeyDiffKeepsTheKeysLeastLikeTheAverage) {
  KVCache c = withKeys({{1, 0}, {1, 0}, {0, 1}, {1, 0.1f}, {-1, 0}, {1, 0}});
  Policy p(parsePolicy("keydiff:tokens=4,sinks=1,recent=1", ""), layout(), nullptr);
  p.afterStep(c, {}, 5, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 2, 4, 5}));
}

// CUR: keys = values (1,0) (3,0) (1,1) (0,2) (2,0) (0,1), squared norms 1 9 2 4 4 1. In local
// windows of 2 they are shares .1 .9 | 1/3 2/3 | .8 .2; key share x value share = .01 .81 1/9 4/9
// .64 .04, normalized by their sum; the best two are entries 1 and 4. Over the whole head (local=0)
// the shares are n/21 and the product's order is 1, then 3 and 4 tied (the lower place wins).
TEST(KvEviction, CurKeepsTheEntriesOfHighKeyAndValueLeverage) {
  KVCache c = withKeys({{1, 0}, {3, 0}, {1, 1}, {0, 2}, {2, 0}, {0, 1}});
  std::vector<float> scratch;
  std::vector<double> got(6);
  curScores(c.rows(0, 0, scratch), 6, 2, 2, got.data());
  const std::vector<double> want = {0.01, 0.81, 1.0 / 9, 4.0 / 9, 0.64, 0.04};
  const double total = std::accumulate(want.begin(), want.end(), 0.0);
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(got[i], want[i] / total, 1e-12) << i;
  Policy local(parsePolicy("cur:tokens=2,sinks=0,recent=0,local=2", ""), layout(), nullptr);
  local.afterStep(c, {}, 5, false);
  EXPECT_EQ(positions(c), (std::vector<int>{1, 4}));
  KVCache whole = withKeys({{1, 0}, {3, 0}, {1, 1}, {0, 2}, {2, 0}, {0, 1}});
  Policy p(parsePolicy("cur:tokens=2,sinks=0,recent=0,local=0", ""), layout(), nullptr);
  p.afterStep(whole, {}, 5, false);
  EXPECT_EQ(positions(whole), (std::vector<int>{1, 3}));
  EXPECT_THROW(parsePolicy("cur:budget=0.5,local=-1", ""), std::invalid_argument);
}

// Expected attention, no RoPE: queries (1,0) and (3,0) have mean (2,0) and covariance diag(1,0);
// keys = values (1,0) (0,1) (-1,0) (2,0) get logits mu.k/sqrt(2) + k^T S k/4 = sqrt(2) + 1/4, 0,
// -sqrt(2) + 1/4, 2 sqrt(2) + 1; scores are their softmax times ||v|| (1, 1, 1, 2). Two kept: 3, 0.
TEST(KvEviction, ExpectedAttentionKeepsWhatTheQueriesDistributionWouldAttend) {
  KVCache c = withKeys({{1, 0}, {0, 1}, {-1, 0}, {2, 0}});
  const std::vector<int> pos = {0, 1, 2, 3};
  QueryStats q;
  const float q1[2] = {1, 0}, q2[2] = {3, 0};
  q.add(q1, 2), q.add(q2, 2);
  std::vector<float> scratch;
  std::vector<double> got(4);
  expectedAttentionScores(c.rows(0, 0, scratch), pos.data(), 4, 2, {q}, {}, 4, 512, 0, got.data());
  const double r2 = std::sqrt(2.0);
  const std::vector<double> logit = {r2 + 0.25, 0, -r2 + 0.25, 2 * r2 + 1}, vnorm = {1, 1, 1, 2};
  double total = 0;
  for (double x : logit) total += std::exp(x);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got[i], std::exp(logit[i]) / total * vnorm[i], 1e-12) << i;

  StepAttention a;  // the same queries through the policy, as the model hands them over
  a.T = 2, a.want_probabilities = false, a.want_queries = true;
  a.queries = {{1, 0, 3, 0}};
  Policy p(parsePolicy("expected:tokens=2,sinks=0,recent=0", ""), layout(), nullptr);
  p.afterStep(c, a, 3, true);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 3}));
}

// With RoPE: one query repeated (no covariance) and future=1, the rotation averaged over the next
// position is that position's, so the expected logits are the attention logits of the query
// rotated to it (kernels::applyRope) against the cached keys.
TEST(KvEviction, ExpectedAttentionRotatesTheMeanQueryToTheNextPosition) {
  const int hd = 4, n = 5, next = 9;
  const std::vector<float> inv_freq = {1.0f, 0.01f};
  std::vector<float> keys(n * hd), query = {0.3f, -1.2f, 0.8f, 0.5f}, rotated = query;
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  for (auto& x : keys) x = dist(rng);
  std::vector<float> ones(n * hd, 1.0f);  // ||v|| = 2 for every entry
  const std::vector<int> pos = {0, 1, 2, 3, 4};
  QueryStats q;
  for (int t = 0; t < 3; ++t) q.add(query.data(), hd);
  std::vector<double> got(n);
  expectedAttentionScores({keys.data(), ones.data()}, pos.data(), n, hd, {q}, inv_freq, next, 1, 0, got.data());
  kernels::applyRope(rotated.data(), 1, 1, hd, &next, inv_freq.data());
  std::vector<double> logit(n);
  double total = 0;
  for (int e = 0; e < n; ++e) {
    for (int i = 0; i < hd; ++i) logit[e] += double(rotated[i]) * keys[e * hd + i] / 2.0;
    total += std::exp(logit[e]);
  }
  for (int e = 0; e < n; ++e) EXPECT_NEAR(got[e], 2 * std::exp(logit[e]) / total, 1e-6) << e;
}

// CriticalKV over StreamingLLM (score = position): tokens=4 in one head, critical=0.5 keeps the
// best 2 by position first (5, 4); the others compete by (position + 1e-4) x ||W_o v||_1, norms
// 10, 5, 0.1, 1 for positions 0..3: 0.001, 5.0005, 0.2, 3.0003, so 1 and 3 join them (without
// critical=, 2 and 3 would).
TEST(KvEviction, CriticalKvRescalesTheSecondStageByTheOutputNorm) {
  KVCache c = withKeys({{1, 0}, {1, 0}, {1, 0}, {1, 0}, {1, 0}, {1, 0}});
  StepAttention a;
  a.T = 6, a.want_probabilities = false, a.want_output_norms = true;
  a.output_norms = {{10, 5, 0.1f, 1, 7, 7}};
  Policy p(parsePolicy("streamingllm:tokens=4,sinks=0,recent=0,critical=0.5", ""), layout(), nullptr);
  p.afterStep(c, a, 5, true);
  EXPECT_EQ(positions(c), (std::vector<int>{1, 3, 4, 5}));
  EXPECT_EQ(c.head(0, 0).out_norm, (std::vector<float>{5, 1, 7, 7}));  // kept with their entries
  // A step's norms are its own entries' (the last T): more norms than entries is the caller's
  // mistake, refused rather than written before the head's first entry.
  a.output_norms = {{1, 2, 3, 4, 5}};
  EXPECT_THROW(p.afterStep(c, a, 6, false), std::logic_error);
  EXPECT_THROW(parsePolicy("knorm:budget=0.5,critical=0.5", ""), std::invalid_argument);  // negative scores
  EXPECT_THROW(parsePolicy("h2o:budget=0.5,critical=1.5", ""), std::invalid_argument);
}

// Block-wise prompt compression, KeyDiff, one kept: keys (1,0) (1,0) (0,1) (-1,0) (-1,0) in blocks of
// 2 after the first entry. {0, 1, 2}: the normalized mean is (2/3, 1/3), (0,1) the least like it:
// kept. {2, 3, 4}: mean (-2/3, 1/3), (0,1) again (cos 0.447 against 0.894). The whole prompt at
// once has mean (0, 1/5), to which (0,1) is the most alike: the others tie and the first stays.
TEST(KvEviction, BlocksDecideWhatEachBlockAndTheSurvivorsShow) {
  const std::vector<std::array<float, 2>> keys = {{1, 0}, {1, 0}, {0, 1}, {-1, 0}, {-1, 0}};
  KVCache blocks = withKeys(keys), whole = withKeys(keys);
  Policy(parsePolicy("keydiff:tokens=1,sinks=0,recent=0,block=2", ""), layout(), nullptr).afterStep(blocks, {}, 4, true);
  Policy(parsePolicy("keydiff:tokens=1,sinks=0,recent=0", ""), layout(), nullptr).afterStep(whole, {}, 4, true);
  EXPECT_EQ(positions(blocks), (std::vector<int>{2}));
  EXPECT_EQ(positions(whole), (std::vector<int>{0}));
  // K-norm's score does not depend on the others: blocks keep what the whole prompt keeps.
  std::vector<std::array<float, 2>> random(40);
  std::mt19937 rng(4);
  std::normal_distribution<float> d;
  for (auto& k : random) k = {d(rng), d(rng)};
  KVCache a = withKeys(random), b = withKeys(random);
  Policy(parsePolicy("knorm:tokens=9,sinks=0,recent=0,block=5", ""), layout(), nullptr).afterStep(a, {}, 39, true);
  Policy(parsePolicy("knorm:tokens=9,sinks=0,recent=0", ""), layout(), nullptr).afterStep(b, {}, 39, true);
  EXPECT_EQ(positions(a), positions(b));
  EXPECT_EQ(positions(a).size(), 9u);
  EXPECT_THROW(parsePolicy("h2o:budget=0.5,block=8", ""), std::invalid_argument);  // reads no rows
  EXPECT_THROW(parsePolicy("knorm:budget=0.5,block=8,chunk=2", ""), std::invalid_argument);
}

// Leverage: centred keys (3,0) (-1,0) (-1,0) (-1,0) (0,1) (0,-1) give X^T X = diag(12, 2), so
// leverages 9/12, 1/12 (three times), 1/2, 1/2 — z-scored over the head; the two outlier
// directions are kept. Keys cached after RoPE score as their pre-RoPE selves.
TEST(KvEviction, LeverageKeepsTheGeometricOutliers) {
  KVCache c = withKeys({{3, 0}, {-1, 0}, {-1, 0}, {-1, 0}, {0, 1}, {0, -1}});
  std::vector<float> scratch;
  std::vector<double> got(6);
  const std::vector<int> pos = {0, 1, 2, 3, 4, 5};
  leverageScores(c.rows(0, 0, scratch), pos.data(), 6, 2, {}, got.data());
  const std::vector<double> raw = {0.75, 1.0 / 12, 1.0 / 12, 1.0 / 12, 0.5, 0.5};
  double mean = 0, var = 0;
  for (double r : raw) mean += r / 6;
  for (double r : raw) var += (r - mean) * (r - mean) / 5;
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(got[i], (raw[i] - mean) / std::sqrt(var), 1e-5) << i;
  Policy p(parsePolicy("leverage:tokens=3,sinks=0,recent=0", ""), layout(), nullptr);
  p.afterStep(c, {}, 5, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 4, 5}));

  // RoPE: keys rotated by their positions, with the frequencies, score as the unrotated keys.
  const int hd = 4, n = 7;
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> k(size_t(n) * hd), rotated;
  for (auto& x : k) x = d(rng);
  rotated = k;
  const std::vector<float> inv_freq = {1.0f, 0.01f};
  std::vector<int> at(n);
  for (int i = 0; i < n; ++i) at[i] = 3 * i + 1, kernels::applyRope(rotated.data() + i * hd, 1, 1, hd, &at[i], inv_freq.data());
  std::vector<double> plain(n), back(n);
  leverageScores({k.data(), k.data()}, at.data(), n, hd, {}, plain.data());
  leverageScores({rotated.data(), rotated.data()}, at.data(), n, hd, inv_freq, back.data());
  for (int i = 0; i < n; ++i) EXPECT_NEAR(back[i], plain[i], 1e-4) << i;
}

// Non-causal chunked attention (Compactor): in chunks of 2 every query attends to both keys of its
// chunk, the later one too. Keys (1,0) (0,1) (1,0) (0,1), values the same (norm 1); queries
// (ln 3, 0), 0, (0, ln 3), 0: chunk one gives key 0 3/4 + 1/2 and key 1 1/4 + 1/2, chunk two the
// mirror image, so the attention is 5/4, 3/4, 3/4, 5/4; averaged with the neighbours (zeros past
// the ends) 2/3, 11/12, 11/12, 2/3, z-scored -sqrt(3)/2, sqrt(3)/2, sqrt(3)/2, -sqrt(3)/2: the
// middle entries are kept (without the pooling the outer ones would be). Compactor adds `blend`
// times the leverage z-score.
TEST(KvEviction, NonCausalAttentionScoresEachChunkByItsOwnQueries) {
  KVCache c = withKeys({{1, 0}, {0, 1}, {1, 0}, {0, 1}});
  const std::vector<int> pos = {0, 1, 2, 3};
  const float l3 = std::log(3.0f);
  const std::vector<float> queries = {l3, 0, 0, 0, 0, l3, 0, 0};
  std::vector<float> scratch;
  std::vector<double> attention(4, 0.0), got(4);
  nonCausalAttention(c.rows(0, 0, scratch), pos.data(), 4, 2, queries, 4, {}, 2, attention.data());
  const std::vector<double> hand = {1.25, 0.75, 0.75, 1.25};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(attention[i], hand[i], 1e-6) << i;
  nonCausalScores(c.rows(0, 0, scratch), 4, 2, attention.data(), got.data());
  const double z = std::sqrt(3.0) / 2;
  const std::vector<double> scores = {-z, z, z, -z};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got[i], scores[i], 1e-6) << i;

  StepAttention a;  // the same queries through the policy, as the model hands them over at the prompt's end
  a.T = 4, a.want_probabilities = false, a.want_queries = true;
  a.queries = {queries};
  Policy p(parsePolicy("noncausal:tokens=2,sinks=0,recent=0,span=2", ""), layout(), nullptr);
  p.afterStep(c, a, 3, true);
  EXPECT_EQ(positions(c), (std::vector<int>{1, 2}));

  // Compactor on random keys and queries: the top three by noncausal + blend x leverage.
  const int n = 8;
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<std::array<float, 2>> keys(n);
  for (auto& k : keys) k = {d(rng), d(rng)};
  std::vector<float> q(size_t(n) * 2);
  for (auto& x : q) x = d(rng);
  KVCache r = withKeys(keys);
  std::vector<int> at(n);
  std::iota(at.begin(), at.end(), 0);
  std::vector<double> att(n, 0.0), nc(n), lev(n);
  nonCausalAttention(r.rows(0, 0, scratch), at.data(), n, 2, q, n, {}, 4, att.data());
  nonCausalScores(r.rows(0, 0, scratch), n, 2, att.data(), nc.data());
  leverageScores(r.rows(0, 0, scratch), at.data(), n, 2, {}, lev.data());
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return nc[x] + 3 * lev[x] > nc[y] + 3 * lev[y]; });
  std::vector<int> top(order.begin(), order.begin() + 3);
  std::sort(top.begin(), top.end());
  a.T = n, a.queries = {q};
  Policy compactor(parsePolicy("compactor:tokens=3,sinks=0,recent=0,span=4,blend=3", ""), layout(), nullptr);
  compactor.afterStep(r, a, n - 1, true);
  EXPECT_EQ(positions(r), top);
  EXPECT_THROW(parsePolicy("noncausal:budget=0.5,blend=1", ""), std::invalid_argument);
  EXPECT_THROW(parsePolicy("compactor:budget=0.5,span=0", ""), std::invalid_argument);
}

// Finch (kvpress's FinchPress): SnapKV's window, each row's attention weighted by its place (n - T
// + t: the keys before it, kvpress's normalization), no pooling, the window itself kept. Six
// entries, a window of two: row 4 puts all its attention on entry 1 (weight 4), row 5 0.85 on
// entry 2 (weight 5), so entry 2 scores 4.25 against entry 1's 4 and is kept (SnapKV's plain sum,
// 1 against 0.85, would keep entry 1, given the same two protected).
TEST(KvEviction, FinchWeighsEachWindowRowByTheKeysBeforeIt) {
  KVCache c = filled(6);
  StepAttention a;
  a.T = 6;
  a.blocks.assign(1, std::vector<float>(36, 0.0f));
  for (int t = 0; t < 4; ++t) a.blocks[0][size_t(t) * 6 + t] = 1.0f;  // outside the window: not counted
  a.blocks[0][4 * 6 + 1] = 1.0f;
  a.blocks[0][5 * 6 + 2] = 0.85f, a.blocks[0][5 * 6 + 5] = 0.15f;
  Policy p(parsePolicy("finch:tokens=3,sinks=0,recent=0,window=2", ""), layout(), nullptr);
  p.afterStep(c, a, 5, true);
  EXPECT_EQ(positions(c), (std::vector<int>{2, 4, 5}));
  KVCache d = filled(6);
  Policy snap(parsePolicy("snapkv:tokens=3,sinks=0,recent=2,window=2,kernel=1", ""), layout(), nullptr);
  snap.afterStep(d, a, 5, true);
  EXPECT_EQ(positions(d), (std::vector<int>{1, 4, 5}));
}

// ThinK: channel c of a head scores (sum of q_c^2 over the window's queries) x (sum of k_c^2 over
// its keys). Keys (1,2,0,1) (1,0,3,1) (1,2,0,1), two window queries (1,1,1,0): 2 x 3, 2 x 8,
// 2 x 9, 0 x 3 = 6, 16, 18, 0, so think=0.5 zeroes channels 3 and 0 of the prompt's keys; the
// bytes lose 2 channels x 2 bytes a prompt key, and a key decoded later keeps all four.
TEST(KvEviction, ThinkPrunesTheKeyChannelsTheWindowUsesLeast) {
  KVCache c(1, 1, 4);
  const std::vector<std::array<float, 4>> keys = {{1, 2, 0, 1}, {1, 0, 3, 1}, {1, 2, 0, 1}, {5, 5, 5, 5}};
  for (int t = 0; t < 3; ++t) c.append(0, keys[t].data(), keys[t].data(), &t, 1);
  StepAttention a;
  a.T = 3, a.want_probabilities = false, a.want_queries = true;
  a.queries = {{9, 9, 9, 9, 1, 1, 1, 0, 1, 1, 1, 0}};  // the first row lies outside the window
  Policy p(parsePolicy("full:think=0.5,window=2", ""), layout(1, 4), nullptr);
  EXPECT_TRUE(p.spec().compresses());
  p.afterStep(c, a, 2, true);
  const std::vector<float> pruned = {0, 2, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0};
  EXPECT_EQ(c.head(0, 0).keys, pruned);
  EXPECT_EQ(p.bytes(c, 3).stored, 3 * 4 * 4 - 3 * 2 * 2);
  c.append(0, keys[3].data(), keys[3].data(), std::array<int, 1>{3}.data(), 1);
  StepAttention step;
  step.T = 1, step.want_probabilities = false, step.want_queries = true;
  step.queries = {{1, 1, 1, 1}};
  p.afterStep(c, step, 3, false);
  EXPECT_EQ(std::vector<float>(c.head(0, 0).keys.begin() + 12, c.head(0, 0).keys.end()), (std::vector<float>{5, 5, 5, 5}));
  EXPECT_EQ(p.bytes(c, 4).stored, 4 * 4 * 4 - 3 * 2 * 2);
  EXPECT_THROW(parsePolicy("h2o:budget=0.5,think=0.5", "int8"), std::invalid_argument);
  EXPECT_THROW(parsePolicy("h2o:budget=0.5,think=1", ""), std::invalid_argument);
}

// TOVA scores by the newest query alone: in a prompt of three queries the first two attend to
// token 2, the last to token 6; token 6 is kept, token 2 is not. The next step's query replaces
// the scores (H2O would add them up).
TEST(KvEviction, TovaKeepsWhatTheLastQueryAttendsTo) {
  KVCache c = filled(10);
  Policy p(parsePolicy("tova:tokens=4,sinks=1,recent=2", ""), layout(), nullptr);
  StepAttention a;
  a.T = 3;
  for (int hot : {2, 2, 6}) {
    std::vector<float> row(10, 0.01f);
    row[size_t(hot)] = 0.9f;
    a.blocks.resize(1);
    a.blocks[0].insert(a.blocks[0].end(), row.begin(), row.end());
  }
  p.afterStep(c, a, 9, true);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 6, 8, 9}));
  const int next = 10;
  std::vector<float> kv(2, 1.0f);
  c.append(0, kv.data(), kv.data(), &next, 1);
  // The new query attends to entry 2 (position 8): it replaces 6, which summed scores would keep.
  p.afterStep(c, attentionTo({{2}}, 5), 10, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 8, 9, 10}));
}

// LagKV, lag 2 after one sink: partition {1, 2} is scored against {3, 4} (per channel range 0..1):
// entry 1 (0.5, 0.5) normalizes to a standard deviation of 0, entry 2 (0, 1) to 0.707, so within
// the partition entry 1 ranks 0 and entry 2 ranks 1/2; entries 3.. have no successor and score 1.
TEST(KvEviction, LagKvRanksEachPartitionAgainstTheNext) {
  KVCache c = withKeys({{9, 9}, {0.5f, 0.5f}, {0, 1}, {0, 0}, {1, 1}, {3, 3}});
  std::vector<float> scratch;
  std::vector<double> score(6);
  lagScores(c.rows(0, 0, scratch), 6, 2, 1, 2, score.data());
  EXPECT_EQ(score, (std::vector<double>{1, 0, 0.5, 1, 1, 1}));
  Policy p(parsePolicy("lagkv:tokens=5,sinks=1,recent=1,lag=2", ""), layout(), nullptr);
  p.afterStep(c, {}, 5, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 2, 3, 4, 5}));
  lagScores(c.rows(0, 0, scratch), 3, 2, 1, 2, score.data());  // too short for a partition: all kept alike
  EXPECT_EQ(std::vector<double>(score.begin(), score.begin() + 3), (std::vector<double>{1, 1, 1}));
}

// ChunkKV (chunk=3): entries share the mean score of their chunk, so chunks go whole. Attention
// 0.6 on entry 5 and 0.27 on entry 8: chunk {3, 4, 5} averages 0.2, chunk {6, 7, 8} 0.09, and the
// 3 free entries take chunk 3-5, though 8 alone would outscore 3 and 4.
TEST(KvEviction, ChunksAreKeptWhole) {
  KVCache c = filled(12);
  Policy p(parsePolicy("h2o:tokens=5,sinks=1,recent=1,chunk=3", ""), layout(), nullptr);
  StepAttention a;
  a.T = 1;
  a.blocks = {std::vector<float>(12, 0.0f)};
  a.blocks[0][5] = 0.6f, a.blocks[0][8] = 0.27f;
  p.afterStep(c, a, 11, false);
  EXPECT_EQ(positions(c), (std::vector<int>{0, 3, 4, 5, 11}));
  KVCache alone = filled(12);
  Policy q(parsePolicy("h2o:tokens=5,sinks=1,recent=1", ""), layout(), nullptr);
  q.afterStep(alone, a, 11, false);
  EXPECT_EQ(positions(alone), (std::vector<int>{0, 1, 5, 8, 11}));  // without chunks: 5, 8, then the oldest tie
}

// SimLayerKV: at the prompt's end layer 0's last query puts 0.95 of its attention on the sink and
// the recent window (lazy: it streams from then on), layer 1's 0.3 (it keeps everything).
TEST(KvEviction, SimLayerKvStreamsTheLazyLayersOnly) {
  KVCache c(2, 1, 2);
  for (int t = 0; t < 10; ++t) {
    const std::vector<float> kv(2, float(t));
    c.append(0, kv.data(), kv.data(), &t, 1);
    c.append(1, kv.data(), kv.data(), &t, 1);
  }
  HeadLayout two = layout();
  two.layers = 2;
  Policy p(parsePolicy("simlayerkv:sinks=1,recent=2,threshold=0.9", ""), two, nullptr);
  StepAttention a;
  a.T = 2;  // two prompt rows; only the last one counts
  std::vector<float> lazy(20, 0.0f), busy(20, 0.0f);
  lazy[10 + 0] = 0.5f, lazy[10 + 8] = 0.2f, lazy[10 + 9] = 0.25f, lazy[10 + 4] = 0.05f;  // 0.95 on sink + recent
  busy[10 + 0] = 0.1f, busy[10 + 9] = 0.2f, busy[10 + 4] = 0.7f;                           // 0.3
  busy[3] = 1.0f;  // the first row: ignored
  a.blocks = {lazy, busy};
  p.afterStep(c, a, 9, true);
  EXPECT_EQ(c.head(0, 0).positions, (std::vector<int>{0, 8, 9}));
  EXPECT_EQ(c.head(1, 0).length(), 10);
  const int next = 10;
  const std::vector<float> kv(2, 1.0f);
  c.append(0, kv.data(), kv.data(), &next, 1);
  c.append(1, kv.data(), kv.data(), &next, 1);
  p.afterStep(c, {}, 10, false);  // decode: the lazy layer slides, the other grows
  EXPECT_EQ(c.head(0, 0).positions, (std::vector<int>{0, 9, 10}));
  EXPECT_EQ(c.head(1, 0).length(), 11);
  EXPECT_THROW(parsePolicy("simlayerkv:budget=0.2", ""), std::invalid_argument);
}

// interval=3: a per-step method decides every third decode step; the cache grows in between.
TEST(KvEviction, AnIntervalDecidesEveryNthDecodeStep) {
  KVCache c = filled(8);
  Policy p(parsePolicy("streamingllm:tokens=4,sinks=1,recent=1,interval=3", ""), layout(), nullptr);
  p.afterStep(c, {}, 7, true);  // the prompt: decided
  EXPECT_EQ(c.head(0, 0).length(), 4);
  std::vector<float> kv(2, 0.0f);
  std::vector<int> lengths;
  for (int pos = 8; pos < 14; ++pos) {
    c.append(0, kv.data(), kv.data(), &pos, 1);
    p.afterStep(c, {}, pos, false);
    lengths.push_back(c.head(0, 0).length());
  }
  EXPECT_EQ(lengths, (std::vector<int>{5, 6, 4, 5, 6, 4}));
  EXPECT_EQ(positions(c), (std::vector<int>{0, 11, 12, 13}));
}

}  // namespace
}  // namespace kvtp::kv
