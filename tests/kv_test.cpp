// KV compression on small hand-checkable cases: which tokens each method keeps and why,
// quantization error bounds, byte accounting, and the budget-100% identity.
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

namespace kvtp::kv {
namespace {

// A cache of `heads` KV heads, 1 layer, head_dim 2, holding positions 0..n-1.
KVCache filled(int n, int heads = 1, int hd = 2) {
  KVCache c(1, heads, hd);
  for (int t = 0; t < n; ++t) {
    std::vector<float> k(size_t(heads) * hd, float(t)), v(size_t(heads) * hd, float(-t));
    c.append(0, k.data(), v.data(), &t, 1);
  }
  return c;
}

HeadLayout layout(int heads = 1, int hd = 2) {
  HeadLayout l;
  l.layers = 1;
  l.global_kv_heads = l.local_kv_heads = heads;
  l.head_dim = hd;
  return l;
}

std::vector<int> positions(const KVCache& c, int head = 0) { return c.head(0, head).positions; }

// Attention of one decode query over n entries of each head: `hot` entries get weight 0.5 / |hot|,
// the rest share the remaining half.
StepAttention attentionTo(const std::vector<std::vector<int>>& hot, int n) {
  StepAttention a;
  a.T = 1;
  for (auto& h : hot) {
    std::vector<float> row(size_t(n), 0.5f / float(n - h.size()));
    for (int i : h) row[size_t(i)] = 0.5f / float(h.size());
    a.blocks.push_back(row);
  }
  return a;
}

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

void appendToken(KVCache& c, int pos) {
  std::vector<float> k(2, float(pos)), v(2, float(-pos));
  c.append(0, k.data(), v.data(), &pos, 1);
}

TEST(KvEviction, ScopeSlideKeepsThePromptAndTheDecodedHeavyHitters) {
  KVCache c = filled(10);
  Policy p(parsePolicy("snapkv:budget=1,decode=slide,decode_budget=4,decode_recent=2", ""), layout(), nullptr);
  StepAttention prompt;
  prompt.T = 10;
  prompt.blocks.assign(1, std::vector<float>(100, 0.01f));
  p.afterStep(c, prompt, 9, true);  // budget 1: the prompt stays whole
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
  StepAttention prompt;
  prompt.T = 4;
  prompt.blocks.assign(1, std::vector<float>(16, 0.1f));
  p.afterStep(c, prompt, 3, true);
  std::vector<int> lengths;
  for (int pos = 4; pos < 13; ++pos) {
    appendToken(c, pos);
    p.afterStep(c, attentionToPositions(c, {}), pos, false);
    lengths.push_back(c.head(0, 0).length() - 4);  // decoded entries held
  }
  // Steps 1..9: the cache grows, except at steps 3, 6, 9 where it is cut to 1 + step / 3.
  EXPECT_EQ(lengths, (std::vector<int>{1, 2, 2, 3, 4, 3, 4, 5, 4}));
}

// Two heads, 10 tokens, 4 kept per head on average with one sink and one recent token each.
// Head 0's attention is concentrated on tokens 3, 4, 5 (0.17 each, the rest 0.07); head 1's is
// spread (0.1 each). Returns the cache after one step under `scope`.
KVCache twoHeadsAfterOneStep(const std::string& scope) {
  KVCache c = filled(10, 2);
  Policy p(parsePolicy("h2o:tokens=4,sinks=1,recent=1,scope=" + scope, ""), layout(2), nullptr);
  StepAttention a = attentionTo({{3, 4, 5}, {}}, 10);
  a.blocks[1].assign(10, 0.1f);
  p.afterStep(c, a, 9, false);
  return c;
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

TEST(KvEviction, AGlobalBudgetGoesToTheHeadsWithTheHighestScores) {
  const KVCache c = twoHeadsAfterOneStep("global");
  // 8 slots for 2 heads, 4 of them protected (sink + recent per head). Head 0 takes 3 of the 4
  // free slots; its other tokens (0.07) lose the last one to head 1 (0.1).
  EXPECT_EQ(positions(c, 0), (std::vector<int>{0, 3, 4, 5, 9}));
  EXPECT_EQ(c.head(0, 0).length() + c.head(0, 1).length(), 8);
}

TEST(KvEviction, PerHeadScopeSplitsTheBudgetEvenly) {
  const KVCache c = twoHeadsAfterOneStep("head");
  EXPECT_EQ(c.head(0, 0).length(), 4);
  EXPECT_EQ(c.head(0, 1).length(), 4);
}

// The budget's select by hand: one pool of three heads, protected keys +inf. Budget 5: the two
// protected, then the three keys of 0.5 (0.2 and 0.1 go). Budget 4: only two of the 0.5s fit,
// the first two in table order (head 0's, then head 1's first).
TEST(KvBudgetSelect, KeepsTheHighestKeysTiesInTableOrder) {
  const std::vector<double> h0 = {INFINITY, 0.5, 0.2}, h1 = {0.5, 0.5, INFINITY}, h2 = {0.1};
  const std::vector<SelectHead> heads = {{h0.data(), 3, 0, true}, {h1.data(), 3, 1, true}, {h2.data(), 1, 2, true}};
  std::vector<std::vector<uint8_t>> keep;
  selectBudget(heads, {0, 0, 0}, {5}, nullptr, keep);
  EXPECT_EQ(keep, (std::vector<std::vector<uint8_t>>{{1, 1, 0}, {1, 1, 1}, {0}}));
  selectBudget(heads, {0, 0, 0}, {4}, nullptr, keep);
  EXPECT_EQ(keep, (std::vector<std::vector<uint8_t>>{{1, 1, 0}, {1, 0, 1}, {0}}));
  selectBudget(heads, {0, 0, 0}, {1}, nullptr, keep);  // below the protected: they alone stay
  EXPECT_EQ(keep, (std::vector<std::vector<uint8_t>>{{1, 0, 0}, {0, 0, 1}, {0}}));
  selectBudget(heads, {0, 1, 1}, {1, 2}, nullptr, keep);  // pools: head 0; heads 1 and 2
  EXPECT_EQ(keep, (std::vector<std::vector<uint8_t>>{{1, 0, 0}, {1, 0, 1}, {0}}));
  selectBudget(heads, {0, 0, 0}, {100}, nullptr, keep);  // a budget past every entry keeps them all
  EXPECT_EQ(keep, (std::vector<std::vector<uint8_t>>{{1, 1, 1}, {1, 1, 1}, {1}}));
}

// Against a stable sort of every pool's keys (the definition), on random keys with many ties,
// protected entries and budgets from 0 past the pool's size.
TEST(KvBudgetSelect, EqualsAStableSortOfEachPool) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int table_heads = 1 + int(rng() % 6), pools = 1 + int(rng() % table_heads);
    std::vector<int> pool_of(table_heads);
    for (int t = 0; t < table_heads; ++t) pool_of[t] = std::min(pools - 1, t * pools / table_heads);
    std::vector<std::vector<double>> keys(table_heads);
    for (auto& k : keys) {
      k.resize(rng() % 40);
      for (double& x : k) x = rng() % 9 == 0 ? INFINITY : trial % 2 ? double(rng() % 4) : std::ldexp(double(rng()), -20);
    }
    std::vector<int64_t> budget(pools);
    for (auto& b : budget) b = int64_t(rng() % 60);
    std::vector<SelectHead> heads;
    for (int t = 0; t < table_heads; ++t) heads.push_back({keys[t].data(), int(keys[t].size()), t, true});
    std::vector<std::vector<uint8_t>> keep;
    selectBudget(heads, pool_of, budget, nullptr, keep);
    for (int p = 0; p < pools; ++p) {
      std::vector<std::pair<int, int>> entries;  // (head, index) in table order
      for (int t = 0; t < table_heads; ++t)
        if (pool_of[t] == p)
          for (int e = 0; e < int(keys[t].size()); ++e) entries.push_back({t, e});
      std::stable_sort(entries.begin(), entries.end(),
                       [&](auto a, auto b) { return keys[a.first][a.second] > keys[b.first][b.second]; });
      int64_t room = budget[p];
      for (auto [t, e] : entries) {
        const bool expected = std::isinf(keys[t][e]) || room > 0;  // +inf first in the sorted order
        if (expected) --room;
        EXPECT_EQ(keep[t][e], expected) << "trial " << trial << ", head " << t << ", entry " << e;
      }
    }
  }
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

std::vector<double> decodeLogprobs(const std::string& kv, int prefill = 0) {
  PplJob j = test::fixtureJob("llama3-gqa", Mode::Decode);
  j.kv = kv;
  j.prefill = prefill;
  const auto r = runPplJob(j).result;
  std::vector<double> all;
  for (auto& s : r.sequences) all.insert(all.end(), s.logprobs.begin(), s.logprobs.end());
  return all;
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

TEST(KvEviction, FullBudgetReproducesTheFullCacheExactly) {
  const auto full = decodeLogprobs("");
  for (const char* m : {"h2o:budget=1", "scissorhands:budget=1", "streamingllm:budget=1", "tova:budget=1",
                        "knorm:budget=1", "keydiff:budget=1", "lagkv:budget=1,lag=8", "h2o:budget=1,interval=4",
                        "h2o:budget=1,ladder=fp16/int8/int4/int2", "h2o:budget=1,ladder=fp16/kivi2",
                        "leverage:budget=1",
                        "cur:budget=1", "expected:budget=1", "h2o:budget=1,critical=0.5",
                        "qfilters:budget=1,filters=tests/data/llama3-gqa-qfilters.json"})
    EXPECT_EQ(decodeLogprobs(m), full) << m;
  EXPECT_NE(decodeLogprobs("h2o:budget=0.3"), full);
  const auto prompted = decodeLogprobs("", 16);  // the methods that compress a prompt
  for (const char* m : {"snapkv:budget=1", "noncausal:budget=1", "compactor:budget=1", "finch:budget=1", "full:think=0.01"})
    EXPECT_EQ(decodeLogprobs(m, 16), prompted) << m;
  EXPECT_NE(decodeLogprobs("noncausal:budget=0.3,span=8,sinks=1,recent=2", 16), prompted);
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

TEST(KvEviction, ProtectedDefaultDoesNotCollapse) {
  // The trained default model, 2 windows of 512 tokens decoded with 20% of the cache.
  auto ppl = [](const std::string& kv) {
    PplJob j = test::heldOutC4Job(512, 2, Mode::Decode);
    j.kv = kv;
    return runPplJob(j).result.ppl();
  };
  const double full = ppl(""), guarded = ppl("h2o:budget=0.2"), bare = ppl("h2o:budget=0.2,sinks=0,recent=0");
  EXPECT_LT(guarded, 1.2 * full) << "sinks + recent window should keep 20% of the cache close to full";
  EXPECT_GT(bare, 1.3 * guarded) << "without sinks and a recent window eviction should hurt much more";
}

}  // namespace
}  // namespace kvtp::kv
