// The KV budget decided across real MPI ranks (kv/budget_select.h), run under `mpirun -np 1/2/4/8`:
// every rank holds its share of a model's KV heads (replicated when heads < ranks, as
// runtime/partition.cpp lays them out), and the heads keep exactly the positions a single process
// holding every head keeps; what the decision all-reduces does not grow with the context.
#include <gtest/gtest.h>

#include <cstdint>

#include "kv/policy.h"

namespace kvtp::kv {
namespace {

comm::Topology& topology() {
  static comm::Topology t = comm::makeTopology(0);
  return t;
}

constexpr int kLayers = 3, kHeads = 4, kHeadDim = 2;

// The layout of this rank's heads among kHeads, as runtime/partition.cpp's headLayout.
HeadLayout layoutOf(int rank, int ranks) {
  HeadLayout h;
  h.layers = kLayers, h.global_kv_heads = kHeads, h.head_dim = kHeadDim;
  h.replicated = kHeads < ranks;
  h.local_kv_heads = h.replicated ? 1 : kHeads / ranks;
  h.kv_head_begin = h.replicated ? rank / (ranks / kHeads) : rank * h.local_kv_heads;
  h.owner = !h.replicated || rank % (ranks / kHeads) == 0;
  return h;
}

// A decode step's attention to entry i of (layer, global head): a few distinct levels, so that
// many entries tie across heads and layers and the tie-break decides.
float weight(int layer, int head, int i, int n) { return float(1 + (i * 7 + head * 3 + layer) % 5) / float(3 * n); }

// Keeps, per (layer, global head), what the policy kept of `n` positions after one decode step.
// `share`: this rank's part of a replicated head's attention (the rest comes from the others).
std::vector<std::vector<int>> decide(const std::string& kv, const HeadLayout& lay, comm::Communicator* group, int n,
                                     float share, SelectTraffic* traffic = nullptr) {
  KVCache cache(kLayers, lay.local_kv_heads, kHeadDim);
  std::vector<float> zeros(size_t(lay.local_kv_heads) * kHeadDim, 0.0f);
  for (int t = 0; t < n; ++t)
    for (int l = 0; l < kLayers; ++l) cache.append(l, zeros.data(), zeros.data(), &t, 1);
  StepAttention attn;
  attn.T = 1;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < lay.local_kv_heads; ++h) {
      std::vector<float> row(n);
      for (int i = 0; i < n; ++i) row[i] = share * weight(l, lay.kv_head_begin + h, i, n);
      attn.blocks.push_back(row);
    }
  Policy policy(parsePolicy(kv, ""), lay, group);
  policy.afterStep(cache, attn, n - 1, false);
  if (traffic) *traffic = policy.lastDecisionTraffic();
  std::vector<std::vector<int>> kept(size_t(kLayers) * kHeads);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < lay.local_kv_heads; ++h) kept[size_t(l) * kHeads + lay.kv_head_begin + h] = cache.head(l, h).positions;
  return kept;
}

class BudgetAcrossRanks : public ::testing::TestWithParam<std::string> {};

TEST_P(BudgetAcrossRanks, EveryRankKeepsWhatOneProcessKeeps) {
  comm::Communicator& group = *topology().group;
  const int rank = group.rank(), ranks = group.size();
  const HeadLayout lay = layoutOf(rank, ranks);
  HeadLayout all = layoutOf(0, 1);
  const int n = 200;
  const auto one = decide(GetParam(), all, nullptr, n, 1.0f);
  size_t kept = 0;
  for (auto& h : one) kept += h.size();
  ASSERT_LT(kept, size_t(kLayers) * kHeads * n * 2 / 3) << "the budget should evict";
  // A replicated head's attention is split between the ranks that hold it (they sum it).
  const int copies = lay.replicated ? ranks / kHeads : 1;
  const auto mine = decide(GetParam(), lay, &group, n, 1.0f / float(copies));
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < lay.local_kv_heads; ++h) {
      const size_t t = size_t(l) * kHeads + lay.kv_head_begin + h;
      EXPECT_EQ(mine[t], one[t]) << "rank " << rank << " of " << ranks << ", layer " << l << ", KV head " << t % kHeads;
    }
}

// What the decision all-reduces: the same at 100 and 5000 entries a head, and only above one rank.
TEST_P(BudgetAcrossRanks, TrafficDoesNotGrowWithTheContext) {
  comm::Communicator& group = *topology().group;
  const HeadLayout lay = layoutOf(group.rank(), group.size());
  const int copies = lay.replicated ? group.size() / kHeads : 1;
  SelectTraffic shorter, longer;
  decide(GetParam(), lay, &group, 100, 1.0f / float(copies), &shorter);
  decide(GetParam(), lay, &group, 5000, 1.0f / float(copies), &longer);
  const bool local = group.size() == 1 || GetParam().find("scope=head") != std::string::npos;
  if (local) EXPECT_EQ(longer.bytes, 0);
  else EXPECT_GT(longer.bytes, 0);
  EXPECT_LE(longer.bytes, int64_t(8 * 256 + kLayers * kHeads) * kLayers * 8) << "a few KiB a pool";
  EXPECT_EQ(longer.bytes, shorter.bytes) << "longer context: " << longer.bytes << " B in " << longer.collectives
                                         << " collectives, shorter: " << shorter.bytes << " B";
}

INSTANTIATE_TEST_SUITE_P(Methods, BudgetAcrossRanks,
                         ::testing::Values("h2o:budget=0.3,sinks=2,recent=4", "h2o:budget=0.3,scope=layer",
                                           "h2o:tokens=40,scope=head,sinks=1,recent=1", "scissorhands:budget=0.25",
                                           "streamingllm:budget=0.2", "h2o:budget=0.01,sinks=8,recent=8"),
                         [](const auto& info) { return "m" + std::to_string(info.index); });

}  // namespace
}  // namespace kvtp::kv
