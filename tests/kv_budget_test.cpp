// The budget on small hand-checkable cases: how a global budget and its scopes share the
// entries among heads, the select against its definition (a stable sort of each pool), and the
// budget-100% identity over every method.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "kv/budget_select.h"
#include "kv/policy.h"
#include "ppl_jobs.h"
#include "kv_cases.h"

namespace kvtp::kv {
namespace {

using namespace cases;

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

std::vector<double> decodeLogprobs(const std::string& kv, int prefill = 0) {
  PplJob j = test::fixtureJob("llama3-gqa", Mode::Decode);
  j.kv = kv;
  j.prefill = prefill;
  const auto r = runPplJob(j).result;
  std::vector<double> all;
  for (auto& s : r.sequences) all.insert(all.end(), s.logprobs.begin(), s.logprobs.end());
  return all;
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
