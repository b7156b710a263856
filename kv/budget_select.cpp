#include "kv/budget_select.h"

#include <algorithm>

namespace kvtp::kv {

using kernels::orderedKey;
using kernels::RadixSelect;

SelectTraffic selectBudget(const std::vector<SelectHead>& heads, const std::vector<int>& pool_of,
                           const std::vector<int64_t>& budget, comm::Communicator* group,
                           std::vector<std::vector<uint8_t>>& keep) {
  const int pools = int(budget.size()), table_heads = int(pool_of.size());
  const bool shared = group && group->size() > 1;
  SelectTraffic traffic;
  auto allReduce = [&](std::vector<double>& v) {
    if (!shared) return;
    group->allReduceSum(v.data(), v.size());
    traffic.bytes += int64_t(v.size() * sizeof(double)), ++traffic.collectives;
  };
  std::vector<RadixSelect> select(budget.size());
  for (int p = 0; p < pools; ++p) select[p] = RadixSelect::start(budget[p]);
  // Each counted head's entries still under its pool's prefix: every entry before the first pass,
  // then those in the byte picked (a decode step's pass leaves a handful).
  std::vector<std::vector<int>> under(heads.size());
  for (size_t i = 0; i < heads.size(); ++i)
    if (heads[i].counted) {
      under[i].resize(size_t(heads[i].n));
      for (int e = 0; e < heads[i].n; ++e) under[i][e] = e;
    }
  std::vector<double> hist(size_t(pools) * 256);
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (std::all_of(select.begin(), select.end(), [](const RadixSelect& s) { return s.done; })) break;
    std::fill(hist.begin(), hist.end(), 0.0);
    for (size_t i = 0; i < heads.size(); ++i) {
      const int p = pool_of[heads[i].table_head];
      for (int e : under[i]) hist[size_t(p) * 256 + ((orderedKey(heads[i].keys[e]) >> shift) & 255)] += 1;
    }
    allReduce(hist);
    for (int p = 0; p < pools; ++p) select[p].pick(hist.data() + size_t(p) * 256, shift);
    for (size_t i = 0; i < heads.size(); ++i) {
      const RadixSelect& s = select[pool_of[heads[i].table_head]];
      std::erase_if(under[i], [&](int e) { return s.done || !s.under(orderedKey(heads[i].keys[e])); });
    }
  }
  // The keys equal to each pool's threshold: counted per table head, shared out in table order.
  std::vector<double> equal(pool_of.size(), 0.0);
  for (size_t i = 0; i < heads.size(); ++i) equal[heads[i].table_head] = double(under[i].size());
  allReduce(equal);
  std::vector<int64_t> quota(pool_of.size());
  kernels::tieQuotas(equal.data(), pool_of.data(), table_heads, select.data(), quota.data());
  keep.resize(heads.size());
  for (size_t i = 0; i < heads.size(); ++i) {
    const SelectHead& h = heads[i];
    const uint64_t threshold = select[pool_of[h.table_head]].threshold();
    int64_t ties = quota[h.table_head];
    keep[i].assign(size_t(h.n), 0);
    for (int e = 0; e < h.n; ++e) {
      const uint64_t u = orderedKey(h.keys[e]);
      keep[i][e] = u > threshold || (u == threshold && ties-- > 0);
    }
  }
  return traffic;
}

}  // namespace kvtp::kv
