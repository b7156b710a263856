// The budget's decision across ranks (docs/KV.md, "One budget across ranks"): in each
// competition pool keep the r highest keys, ties to the lower place in the global table, where r
// is the pool's budget held between the protected entries (+inf, always kept) and the entries
// that are not holes (-inf, never kept) — kv::Policy's rule, taken here on the CPU over the
// host group (MPI) and by the CUDA engine on the device over NCCL (kernels/cuda/eviction.cu),
// both with kernels::RadixSelect.
//
// The table is every entry of every head in (layer, global KV head, position) order, but no
// rank builds it: a radix select finds each pool's r-th highest key from eight byte-wide
// histograms, each all-reduced over the tensor-parallel group (pools x 256 counts), then the keys
// equal to it are shared out in table order from their count per head (one all-reduce of a
// count per table head). What crosses the group per decision depends on the pools and heads,
// never on how many entries the cache holds.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "kernels/radix_select.h"

namespace kvtp::kv {

// One (layer, KV head) this rank holds, as the decision sees it.
struct SelectHead {
  const double* keys;  // its entries' keys, in entry (position) order
  int n;
  int table_head;      // its (layer, global KV head) index: layer * global_kv_heads + head
  bool counted;        // its entries count in the histograms (a replicated head: one copy does)
};

// What a decision sent through collectives (the test that it does not grow with the cache).
struct SelectTraffic {
  int64_t bytes = 0;
  int collectives = 0;
};

// keep[i][e]: whether entry e of heads[i] is kept. pool_of: the pool of every table head, every
// rank's (nondecreasing); budget: each pool's, in entries. `group` null: every pool lies on this
// rank (a pool per head), the decision is local.
SelectTraffic selectBudget(const std::vector<SelectHead>& heads, const std::vector<int>& pool_of,
                           const std::vector<int64_t>& budget, comm::Communicator* group,
                           std::vector<std::vector<uint8_t>>& keep);

}  // namespace kvtp::kv
