// Tiered precision (docs/KV.md, "Tiered precision"): kv::Policy's ladder, each entry's form
// chosen by its importance under one byte budget — Policy's members for it, apart from the
// single-form decisions in kv/policy.cpp.
#include <algorithm>
#include <vector>

#include "kv/budget_select.h"
#include "kv/policy.h"

namespace kvtp::kv {

// Tiered precision. Rung j costs b_j bytes an entry (its form as stored, and its position); a
// pool's budget is its entry budget at b_0 (fp16). The protected (sinks and recent window) take
// their fp16 bytes first; of the rest, the pool keeps as many entries as fit at the lowest rung,
// the most important first, and the bytes left lift the most important entries to the top rung
// (n_0 = left / (b_0 - b_min)), then the next ones to the next rung, and so on. So a budget of 1
// keeps every entry at fp16, and a small one keeps the most important at the lowest rung. The
// rungs are filled from the top, each by a select over the group as eviction's (see below); an
// entry is never lifted above the form it has.
void Policy::settleLadder(KVCache& cache, const std::vector<SelectHead>& heads, const std::vector<int>& pool_of,
                          int last_pos, bool shared) {
  const int L = lay_.layers, H = lay_.local_kv_heads, rungs = int(spec_.ladder.size());
  const int hd = lay_.head_dim;
  const StoreShape shape{hd, spec_.bits, spec_.group};
  const bool kivi = spec_.ladder.back() == Form::Kivi;
  // Bytes of an entry at each rung, its position included; a KIVI entry also pays its share of a
  // full run's key parameters.
  const double run_bytes = double(shape.bytes(Form::Kivi, 0, 1));
  std::vector<double> cost(static_cast<size_t>(rungs));
  for (int j = 0; j < rungs; ++j)
    cost[j] = double(shape.bytes(spec_.ladder[j], 1) + 4) +
              (spec_.ladder[j] == Form::Kivi ? run_bytes / spec_.group : 0.0);
  const std::vector<int64_t> entry_budget = budgets(last_pos);
  const int pools = int(entry_budget.size());
  // Per pool, over every rank: its entries and the protected among them (at fp16 whatever the
  // budget: their bytes come first).
  std::vector<double> held(2 * static_cast<size_t>(pools), 0.0);
  for (const SelectHead& h : heads)
    if (h.counted) {
      held[2 * pool_of[h.table_head]] += h.n;
      held[2 * pool_of[h.table_head] + 1] += double(std::count(h.keys, h.keys + h.n, INFINITY));
    }
  if (shared) group_->allReduceSum(held.data(), held.size());
  std::vector<int8_t> placed_at;  // per entry of this rank, flattened by head: its rung, or -1
  std::vector<size_t> first(heads.size() + 1, 0);
  for (size_t k = 0; k < heads.size(); ++k) first[k + 1] = first[k] + size_t(heads[k].n);
  last_traffic_ = {};
  // Every pool filled as docs/KV.md says from its budget less `reserve` bytes: top[j], its
  // unprotected entries at rung j or above (cumulative); then, rung by rung from the top, over the
  // entries not placed yet that can still hold the rung (an entry never moves up), the n_j highest
  // keys of each pool. Keys of the others are -inf for that select, and an entry it keeps at -inf
  // (a pool with fewer candidates than slots) is not placed.
  const auto place = [&](const std::vector<double>& reserve) {
    std::vector<std::vector<int64_t>> top(static_cast<size_t>(rungs), std::vector<int64_t>(static_cast<size_t>(pools)));
    for (int p = 0; p < pools; ++p) {
      const int64_t fixed = int64_t(held[2 * p + 1]), rest = int64_t(held[2 * p]) - fixed;
      const double bytes = std::max(0.0, double(entry_budget[p] - fixed) * cost[0] - reserve[p]),
                   lowest = cost[rungs - 1];
      const int64_t kept = std::min<int64_t>(rest, int64_t(bytes / lowest));
      double left = bytes - double(kept) * lowest;
      int64_t placed = 0;
      for (int j = 0; j < rungs; ++j) {
        int64_t n = kept - placed;  // the lowest rung takes the rest
        if (j < rungs - 1) n = std::min<int64_t>(n, int64_t(left / (cost[j] - lowest)));
        left -= double(n) * (cost[j] - lowest);
        placed += n;
        top[j][p] = placed;
      }
    }
    placed_at.assign(first.back(), -1);
    std::vector<double> rung_keys(first.back());
    std::vector<SelectHead> rung_heads = heads;
    std::vector<std::vector<uint8_t>> picked;
    std::vector<double> filled(static_cast<size_t>(pools), 0.0);  // unprotected entries placed so far, every rank
    for (int j = 0; j < rungs; ++j) {
      // The slots of rung j and those above that entries could not take (an entry too far down
      // for a rung waits for the one it can hold).
      std::vector<int64_t> slots(static_cast<size_t>(pools));
      for (int p = 0; p < pools; ++p) slots[p] = top[j][p] - int64_t(filled[p]) + (j ? 0 : int64_t(held[2 * p + 1]));
      for (size_t k = 0; k < heads.size(); ++k) {
        const HeadCache& c = cache.head(int(k) / H, int(k) % H);
        for (int i = 0; i < heads[k].n; ++i) {
          const bool open = placed_at[first[k] + i] < 0 && KVCache::canHold(c.form[i], spec_.ladder[j]);
          rung_keys[first[k] + i] = open ? heads[k].keys[i] : -INFINITY;
        }
        rung_heads[k].keys = rung_keys.data() + first[k];
      }
      const SelectTraffic t = selectBudget(rung_heads, pool_of, slots, shared ? group_ : nullptr, picked);
      last_traffic_.bytes += t.bytes, last_traffic_.collectives += t.collectives;
      std::fill(filled.begin(), filled.end(), 0.0);
      for (size_t k = 0; k < heads.size(); ++k)
        for (int i = 0; i < heads[k].n; ++i) {
          if (picked[k][i] && rung_keys[first[k] + i] > -INFINITY) placed_at[first[k] + i] = int8_t(j);
          if (heads[k].counted && placed_at[first[k] + i] >= 0 && heads[k].keys[i] < INFINITY)
            filled[pool_of[heads[k].table_head]] += 1;
        }
      if (shared && j + 1 < rungs) group_->allReduceSum(filled.data(), filled.size());
    }
  };
  // Which of head k's entries the decision keeps (protected ones included), and which of those
  // rank KIVI but are not KIVI yet: they wait in their form until `group` of them make a run,
  // oldest first (as KIVI's residual window).
  const auto kept = [&](size_t k, int i) {
    const int j = heads[k].keys[i] == INFINITY ? 0 : placed_at[first[k] + i];
    return j >= 0 && heads[k].keys[i] >= spec_.evict_below ? j : -1;
  };
  const auto waits = [&](size_t k, int i, int j) {
    return j >= 0 && spec_.ladder[j] == Form::Kivi && cache.head(int(k) / H, int(k) % H).form[i] != Form::Kivi;
  };
  // What a decision leaves held beyond the costs it counted, per pool over every rank: the entries
  // left waiting (at their form's bytes, not KIVI's) and the key pairs of runs eviction thinned
  // (a run's pairs are paid whole while any of its entries stays).
  const auto excess = [&] {
    std::vector<double> e(static_cast<size_t>(pools), 0.0);
    for (size_t k = 0; k < heads.size(); ++k) {
      if (!heads[k].counted) continue;
      const HeadCache& c = cache.head(int(k) / H, int(k) % H);
      std::vector<int> run_kept(c.group_rows.size(), 0), waiting;
      for (int i = 0, row = 0; i < heads[k].n; ++i) {
        const int j = kept(k, i);
        if (c.form[i] == Form::Kivi && j >= 0) ++run_kept[c.kivi_group[row]];
        if (c.form[i] == Form::Kivi) ++row;
        if (waits(k, i, j)) waiting.push_back(i);
      }
      double& x = e[pool_of[heads[k].table_head]];
      for (size_t w = waiting.size() / spec_.group * spec_.group; w < waiting.size(); ++w)
        x += double(shape.bytes(c.form[waiting[w]], 1) + 4) - cost[rungs - 1];
      for (const int n : run_kept) x += n > 0 ? run_bytes - n * run_bytes / spec_.group : 0.0;
    }
    if (shared) group_->allReduceSum(e.data(), e.size());
    return e;
  };
  // The budget sets that excess aside: first as the last decision left it, then as the decision
  // would leave it, growing, until the decision holds within its budget. The excess jumps with
  // how many entries wait (a run takes 32 at once), so that may not settle in a few passes; then
  // each pool bisects between the last reserve it overran and the most the excess could be —
  // every head with a run less one waiting at fp16 and each run kept thinned to one entry, which
  // always holds (a pool's decision depends on its own reserve alone).
  std::vector<double> reserve = ladder_reserve_;
  reserve.resize(static_cast<size_t>(pools), 0.0);
  place(reserve);
  for (int pass = 0; kivi; ++pass) {
    const std::vector<double> after = excess();
    const std::vector<double> over = reserve;  // the reserve each pool overran (or, where it held, that reserve)
    bool within = true;
    for (int p = 0; p < pools; ++p)
      if (after[p] > reserve[p]) reserve[p] = after[p], within = false;
    if (within) {
      ladder_reserve_ = after;
      break;
    }
    if (pass < 3) {
      place(reserve);
      continue;
    }
    std::vector<double> low = over, high(static_cast<size_t>(pools), 0.0);
    for (size_t k = 0; k < heads.size(); ++k)
      if (heads[k].counted)
        high[pool_of[heads[k].table_head]] += (spec_.group - 1) * (cost[0] - cost[rungs - 1]) +
                                              double(cache.head(int(k) / H, int(k) % H).group_rows.size()) * run_bytes;
    if (shared) group_->allReduceSum(high.data(), high.size());
    for (int p = 0; p < pools; ++p)
      if (after[p] <= over[p]) high[p] = low[p] = over[p];
    for (int step = 0; step < 6; ++step) {
      std::vector<double> mid(static_cast<size_t>(pools));
      for (int p = 0; p < pools; ++p) mid[p] = (low[p] + high[p]) / 2;
      place(mid);
      const std::vector<double> then = excess();
      for (int p = 0; p < pools; ++p) (then[p] <= mid[p] ? high[p] : low[p]) = mid[p];
    }
    place(high);
    ladder_reserve_ = excess();
    break;
  }
  for (Form f : spec_.ladder) {
    if (f == Form::Int8) cache.useCodes(8);
    if (f == Form::Kivi) cache.useCodes(spec_.bits, spec_.group);
  }
  // Each head applies its decision: demotions and evictions, then the runs the waiting make.
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const size_t at = size_t(l) * H + h;
      const HeadCache& c = cache.head(l, h);
      std::vector<int> idx, waiting;  // waiting: positions
      std::vector<Form> forms;
      for (int i = 0; i < heads[at].n; ++i) {
        const int j = kept(at, i);
        if (j < 0) continue;  // evicted
        const bool wait = waits(at, i, j);
        if (wait) waiting.push_back(c.positions[i]);
        idx.push_back(i), forms.push_back(wait ? c.form[i] : spec_.ladder[j]);
      }
      cache.demote(l, h, idx, forms);
      std::vector<std::vector<int>> runs;
      for (size_t w = 0; w + spec_.group <= waiting.size(); w += spec_.group) {
        runs.emplace_back();
        for (size_t k = w; k < w + spec_.group; ++k)  // its index now
          runs.back().push_back(
              int(std::lower_bound(c.positions.begin(), c.positions.end(), waiting[k]) - c.positions.begin()));
      }
      if (!runs.empty()) cache.quantizeKivi(l, h, runs, spec_.bits, spec_.group);
    }
}

}  // namespace kvtp::kv
