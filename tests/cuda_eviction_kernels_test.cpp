// The KV cache's compression kernels against their CPU twins: eviction's compaction, the host-held
// rows of tiered precision, the budget's select, KIVI thinned by eviction and the attention over it,
// the row-scored and the prompt's keys, the ring's resize. Runs on the GPU machine; elsewhere each test says it skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/eviction.h"
#include "kv/budget_select.h"
#include "kv/kv_cache.h"
#include "kv/scorers.h"
#include "tests/cuda_test_util.h"

namespace kvtp {
namespace {

using namespace cuda_test;

// Eviction on the device: each head keeps its own ascending rows, moved to the front with their
// positions; rows past the kept count are left alone.
TEST(CudaKernels, CompactKeepsEachHeadsRowsInOrder) {
  REQUIRE_GPU();
  const int kv_heads = 3, hd = 16, capacity = 50, max_kept = 20;
  const std::vector<std::vector<int>> keep = {{0, 1, 2, 40, 49}, {}, {3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22}};
  auto K = randn(size_t(kv_heads) * capacity * hd), V = randn(K.size());
  std::vector<int> pos(size_t(kv_heads) * capacity), flat(size_t(kv_heads) * max_kept, 0), kept;
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = int(i);
  for (int g = 0; g < kv_heads; ++g) {
    kept.push_back(int(keep[g].size()));
    std::copy(keep[g].begin(), keep[g].end(), flat.begin() + size_t(g) * max_kept);
  }
  DeviceBuffer<float> dK(K), dV(V);
  DeviceBuffer<int> dpos(pos), dkeep(flat), dkept(kept);
  cuda::compactKV(dK.get(), dV.get(), dpos.get(), capacity, kv_heads, hd, dkeep.get(), dkept.get(), max_kept);
  const auto gk = dK.download(), gv = dV.download();
  const auto gp = dpos.download();
  for (int g = 0; g < kv_heads; ++g)
    for (int j = 0; j < int(keep[g].size()); ++j) {
      const size_t to = size_t(g) * capacity + j, from = size_t(g) * capacity + keep[g][j];
      EXPECT_EQ(gp[to], pos[from]);
      for (int d = 0; d < hd; ++d) {
        ASSERT_EQ(gk[to * hd + d], K[from * hd + d]) << g << " " << j;
        ASSERT_EQ(gv[to * hd + d], V[from * hd + d]) << g << " " << j;
      }
    }
  EXPECT_EQ(gk[(size_t(0) * capacity + 45) * hd], K[(size_t(0) * capacity + 45) * hd]);  // past the kept: untouched
}

// Host-held forms (tiered precision on the GPU): a step's new rows read out of an fp16 cache at
// each head's own first slot, widened to float exactly; float rows written back at scattered cache
// rows, rounded to fp16 as the host rounds them, the other rows untouched.
TEST(CudaKernels, HostHeldRowsGoBothWays) {
  REQUIRE_GPU();
  const int heads = 3, hd = 32, capacity = 40, rows = 2;
  const std::vector<int> first = {0, 17, 38};
  std::vector<__half> K(size_t(heads) * capacity * hd), V(K.size());
  const auto k0 = randn(K.size()), v0 = randn(V.size());
  for (size_t i = 0; i < K.size(); ++i) K[i] = __float2half_rn(k0[i]), V[i] = __float2half_rn(v0[i]);
  DeviceBuffer<__half> dK(K), dV(V);
  DeviceBuffer<int> dfirst(first);
  DeviceBuffer<float> out_k(poisoned(size_t(heads) * rows * hd)), out_v(poisoned(size_t(heads) * rows * hd));
  cuda::readNewRows(dK.get(), dV.get(), capacity, heads, hd, dfirst.get(), rows, out_k.get(), out_v.get());
  const auto gk = out_k.download(), gv = out_v.download();
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < rows; ++t)
      for (int c = 0; c < hd; ++c) {
        const size_t from = (size_t(h) * capacity + first[h] + t) * hd + c, to = (size_t(h) * rows + t) * hd + c;
        ASSERT_EQ(gk[to], __half2float(K[from])) << h << " " << t;
        ASSERT_EQ(gv[to], __half2float(V[from])) << h << " " << t;
      }
  const std::vector<int64_t> at = {5, 1 * capacity + 39, 2 * capacity};
  const auto k = randn(at.size() * hd), v = randn(at.size() * hd);
  DeviceBuffer<int64_t> dat(at);
  DeviceBuffer<float> dk(k), dv(v);
  cuda::writeRows(dK.get(), dV.get(), hd, dat.get(), int(at.size()), dk.get(), dv.get());
  auto wk = dK.download(), wv = dV.download();
  for (size_t i = 0; i < at.size(); ++i)
    for (int c = 0; c < hd; ++c) {
      EXPECT_EQ(__half2float(wk[at[i] * hd + c]), __half2float(__float2half_rn(k[i * hd + c])));
      EXPECT_EQ(__half2float(wv[at[i] * hd + c]), __half2float(__float2half_rn(v[i * hd + c])));
      wk[at[i] * hd + c] = K[at[i] * hd + c], wv[at[i] * hd + c] = V[at[i] * hd + c];
    }
  for (size_t i = 0; i < K.size(); ++i) ASSERT_EQ(__half2float(wk[i]), __half2float(K[i])) << "row " << i / hd;
}

// The budget's select on the device (cuda::evictionDecide: byte histograms, a block per pool
// picking each byte, ties shared out by a scan over each pool's heads) against its CPU twin,
// kv::selectBudget, entry for entry: 3 layers x 100 heads (a global pool's 300 heads take the tie
// shares' scan past one block of 256), keys drawn from a few values so that ties decide much, with
// holes (-inf) and protected entries (+inf), budgets from none to past every entry; one global
// pool, a pool per layer, a pool per head.
TEST(CudaKernels, BudgetSelectKeepsWhatTheCpuSelectKeeps) {
  REQUIRE_GPU();
  const int L = 3, H = 100, LH = L * H;
  std::mt19937 rng(7);
  const double values[] = {-INFINITY, 0.25, 0.5, 0.5, 1.0, 2.0, 1e300, INFINITY};
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<std::vector<double>> keys(LH);
    std::vector<int> lengths(LH), offsets(LH), head_table(LH);
    std::vector<double> table;
    for (int i = 0; i < LH; ++i) {
      lengths[i] = int(rng() % 41), offsets[i] = int(table.size()), head_table[i] = i;
      for (int e = 0; e < lengths[i]; ++e) {
        // Half the trials Scissorhands-like keys — counts of bits, protected and holes — whose
        // threshold the device finds before its eighth pass (the keys under the prefix are one).
        const double k = trial % 2 ? (rng() % 8 == 0 ? values[rng() % 2 ? 0 : 7] : double(rng() % 17))
                         : rng() % 4 == 0 ? std::ldexp(double(rng() % 1000), -int(rng() % 8))
                                          : values[rng() % 8];
        keys[i].push_back(k), table.push_back(k);
      }
    }
    for (const int pools : {1, L, LH}) {
      std::vector<int> pool_of(LH);
      std::vector<int64_t> entries(pools, 0), budget(pools);
      for (int t = 0; t < LH; ++t) pool_of[t] = t / (LH / pools), entries[pool_of[t]] += lengths[t];
      for (int p = 0; p < pools; ++p) budget[p] = int64_t(rng() % uint64_t(entries[p] + 3));
      std::vector<kv::SelectHead> heads;
      for (int i = 0; i < LH; ++i) heads.push_back({keys[i].data(), lengths[i], i, true});
      std::vector<std::vector<uint8_t>> cpu;
      kv::selectBudget(heads, pool_of, budget, nullptr, cpu);

      DeviceBuffer<double> dtable(table.empty() ? std::vector<double>{0} : table);
      DeviceBuffer<int> dlengths(lengths), doffsets(offsets), dhead_table(head_table), dpool_of(pool_of);
      DeviceBuffer<int64_t> dbudget(budget);
      DeviceBuffer<uint8_t> dkeep(std::max<size_t>(table.size(), 1));
      cuda::EvictionCache c{};
      c.layers = L, c.heads = H, c.length = dlengths.get(), c.table_offset = doffsets.get();
      const cuda::SelectLayout layout{dhead_table.get(), dpool_of.get(), dbudget.get(), LH, pools, true};
      cuda::evictionDecide(c, dtable.get(), layout, {}, dkeep.get());
      const auto gpu = dkeep.download();
      for (int i = 0; i < LH; ++i)
        for (int e = 0; e < lengths[i]; ++e)
          ASSERT_EQ(bool(gpu[size_t(offsets[i]) + e]), bool(cpu[i][e]))
              << "trial " << trial << ", " << pools << " pools, head " << i << ", entry " << e << ", key "
              << keys[i][e] << ", budget " << budget[pool_of[i]];
    }
  }
}

// KIVI thinned by eviction: cuda::kiviEvictionCompact against its CPU twin, kv::KVCache::retain
// over KIVI entries. Two heads of 30 entries, 5 runs of 4 coded then 10 at full precision in a
// ring of 16; head 0 loses three coded rows and two full ones (its holes stay: 8 x 3 is not past
// its 28 slots after), head 1 all of run 1 and most of the others (compacted, its runs renumbered).
// Then again with every head compacted. The
// device's kept entries, in order, must be the CPU's: the same codes, value pairs, key pairs (run
// by run), full rows and positions, and as many runs with a kept row. The coded rows' arrays hold
// fewer rows a head than the slots' (the engine sizes them by what eviction keeps). The pairs held as E: fp32
// (the CPU's) and fp16 (an fp16 cache's, the CPU's rounded; cuda::AffinePair).
template <class E>
bool samePairs(const cuda::AffinePair<E>* device, const float* cpu, int n) {
  for (int i = 0; i < n; ++i) {
    const float2 d = device[i].get(), c = cuda::AffinePair<E>::rounded(cpu[2 * i], cpu[2 * i + 1]).get();
    if (d.x != c.x || d.y != c.y) return false;
  }
  return true;
}

template <class E>
void kiviCompactionThinsRunsAsTheCpuDoes() {
  using Pair = cuda::AffinePair<E>;
  const int H = 2, hd = 16, bits = 4, G = 4, n = 30, coded = 20, capacity = 40, code_capacity = 24, R = 16;
  const std::vector<std::vector<int>> evicted = {{5, 13, 14, 22, 27}, {0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 15, 17, 18, 21}};
  for (const bool compact_all : {false, true}) {
    kv::KVCache cpu(1, H, hd);
    const auto k = randn(size_t(n) * H * hd), v = randn(k.size());
    for (int t = 0; t < n; ++t) cpu.append(0, &k[size_t(t) * H * hd], &v[size_t(t) * H * hd], &t, 1);
    std::vector<std::vector<int>> runs(size_t(coded / G));  // entries 0..19 in runs of G
    for (int i = 0; i < coded; ++i) runs[size_t(i / G)].push_back(i);
    for (int h = 0; h < H; ++h) cpu.quantizeKivi(0, h, runs, bits, G);
    const int cb = hd * bits / 8, VG = hd / G;  // codes of a key (or value) row; value groups
    // The device's layout of the same cache: codes and value pairs per slot, key pairs per run.
    std::vector<uint8_t> K(size_t(H) * code_capacity * cb), V(K.size());
    std::vector<Pair> vp(size_t(H) * code_capacity * VG), kp(size_t(H) * (capacity / G + 1) * hd);
    auto rounded = [](const float* pairs, int count, Pair* to) {
      for (int i = 0; i < count; ++i) to[i] = Pair::rounded(pairs[2 * i], pairs[2 * i + 1]);
    };
    std::vector<float> ring_k(size_t(H) * R * hd), ring_v(ring_k.size());
    std::vector<int> run(size_t(H) * code_capacity), pos(size_t(H) * capacity), flags, offsets, lengths, codeds;
    for (int h = 0; h < H; ++h) {
      const kv::HeadCache& c = cpu.head(0, h);
      for (int i = 0; i < n; ++i) {
        const size_t slot = size_t(h) * capacity + i, row = size_t(h) * code_capacity + i;
        pos[slot] = c.positions[i];
        if (i < coded) {
          std::copy_n(&c.codes[size_t(i) * 2 * cb], cb, &K[row * cb]);
          std::copy_n(&c.codes[size_t(i) * 2 * cb + cb], cb, &V[row * cb]);
          rounded(&c.row_params[size_t(i) * 2 * VG], VG, &vp[row * VG]);
          run[row] = i / G;
        } else {
          std::copy_n(&c.keys[size_t(i - coded) * hd], hd, &ring_k[(size_t(h) * R + i % R) * hd]);
          std::copy_n(&c.values[size_t(i - coded) * hd], hd, &ring_v[(size_t(h) * R + i % R) * hd]);
        }
      }
      rounded(c.key_params.data(), int(c.key_params.size() / 2), &kp[size_t(h) * (capacity / G + 1) * hd]);
      std::vector<int> keep;
      for (int i = 0; i < n; ++i) {
        const bool out = std::count(evicted[h].begin(), evicted[h].end(), i);
        flags.push_back(!out);
        if (!out) keep.push_back(i);
      }
      offsets.push_back(h * n), lengths.push_back(n), codeds.push_back(coded);
      cpu.retain(0, h, keep);
    }
    DeviceBuffer<uint8_t> dK(K), dV(V), dflags(std::vector<uint8_t>(flags.begin(), flags.end()));
    DeviceBuffer<Pair> dvp(vp), dkp(kp);
    DeviceBuffer<float> drk(ring_k), drv(ring_v);
    DeviceBuffer<int> drun(run), dpos(pos), doff(offsets), dlen(lengths), dcoded(codeds), dmap(size_t(H) * (capacity / G + 1)),
        dout(size_t(5) * H);
    DeviceBuffer<uint8_t> scratch(size_t(H) * R * 2 * hd * sizeof(float));
    DeviceBuffer<void*> ptrs(std::vector<void*>{dK.get(), dV.get(), dpos.get(), dkp.get(), dvp.get(), drun.get(), drk.get(), drv.get()});
    void** p = ptrs.get();
    cuda::EvictionCache rows{1, H, capacity, cb, cuda::KeyFormat::F32, p, p + 1, reinterpret_cast<int* const*>(p + 2),
                             nullptr, nullptr, nullptr, nullptr, 0, nullptr, 0, 0, dlen.get(), doff.get()};
    rows.code_capacity = code_capacity;
    const cuda::KiviEviction kivi{hd, cb, VG, R, int(hd * sizeof(float)), int(sizeof(Pair)),
                                  capacity / G + 1, p + 3, p + 4, reinterpret_cast<int* const*>(p + 5), p + 6, p + 7,
                                  dcoded.get(), dmap.get(), scratch.get()};
    cuda::kiviEvictionCompact(rows, kivi, dflags.get(), compact_all, dout.get());
    const auto gK = dK.download(), gV = dV.download();
    const auto gvp = dvp.download(), gkp = dkp.download(), grk = drk.download(), grv = drv.download();
    const auto grun = drun.download(), gpos = dpos.download(), out = dout.download();
    for (int h = 0; h < H; ++h) {
      const kv::HeadCache& c = cpu.head(0, h);
      const int kept_coded = int(std::count(c.form.begin(), c.form.end(), kv::Form::Kivi)), kept = c.length();
      const bool all = compact_all || out[4 * H + h];
      const std::string what = std::string(compact_all ? "compact all" : "holes allowed") + ", head " + std::to_string(h);
      EXPECT_EQ(out[h + H], kept) << what;
      EXPECT_EQ(out[2 * H + h], all ? kept_coded : coded) << what;
      EXPECT_EQ(out[h], out[2 * H + h] + kept - kept_coded) << what;
      EXPECT_EQ(out[3 * H + h], int(c.group_rows.size())) << what;
      EXPECT_EQ(h == 1 || compact_all, bool(out[4 * H + h])) << what;
      // Coded entries: the device's kept slots in order; the CPU's group of each, by its row counts.
      int j = 0, group = 0, left = c.group_rows.empty() ? 0 : c.group_rows[0];
      for (int slot = 0; slot < out[2 * H + h]; ++slot) {
        const size_t s = size_t(h) * capacity + slot, r = size_t(h) * code_capacity + slot;
        if (gpos[s] == cuda::kEvicted) continue;
        ASSERT_LT(j, kept_coded) << what;
        EXPECT_EQ(gpos[s], c.positions[j]) << what;
        EXPECT_TRUE(std::equal(&gK[r * cb], &gK[r * cb] + cb, &c.codes[size_t(j) * 2 * cb])) << what << " entry " << j;
        EXPECT_TRUE(std::equal(&gV[r * cb], &gV[r * cb] + cb, &c.codes[size_t(j) * 2 * cb + cb])) << what << " entry " << j;
        EXPECT_TRUE(samePairs(&gvp[r * VG], &c.row_params[size_t(j) * 2 * VG], VG)) << what;
        if (all) EXPECT_EQ(grun[r], group) << what << ": runs renumbered in order";
        const Pair* pairs = &gkp[(size_t(h) * (capacity / G + 1) + grun[r]) * hd];
        EXPECT_TRUE(samePairs(pairs, &c.key_params[size_t(group) * 2 * hd], hd)) << what << " entry " << j;
        ++j;
        if (--left == 0 && group + 1 < int(c.group_rows.size())) left = c.group_rows[++group];
      }
      EXPECT_EQ(j, kept_coded) << what;
      for (int r = 0; r < kept - kept_coded; ++r) {  // the full-precision rows, after the coded slots
        const int slot = out[2 * H + h] + r;
        EXPECT_EQ(gpos[size_t(h) * capacity + slot], c.positions[kept_coded + r]) << what;
        const size_t at = (size_t(h) * R + slot % R) * hd;
        EXPECT_TRUE(std::equal(&grk[at], &grk[at] + hd, &c.keys[size_t(r) * hd])) << what << " full row " << r;
        EXPECT_TRUE(std::equal(&grv[at], &grv[at] + hd, &c.values[size_t(r) * hd])) << what << " full row " << r;
      }
    }
    if (!compact_all || !std::is_same_v<E, float>) continue;
    // The compacted cache's rows as a host decision reads them (cuda::cachedRows): the CPU's
    // kv::KVCache::rows, codes decoded with their pairs and the ring's rows, bit for bit (fp32
    // pairs: the CPU's).
    std::vector<int> offsets_after, lengths_after, coded_after;
    for (int h = 0, at = 0; h < H; ++h) {
      offsets_after.push_back(at), lengths_after.push_back(out[h]), coded_after.push_back(out[2 * H + h]);
      at += out[h];
    }
    DeviceBuffer<int> doff2(offsets_after), dlen2(lengths_after), dcoded2(coded_after);
    cuda::EvictionCache kivi_rows{1, H, capacity, cb, cuda::KeyFormat::Kivi, p, p + 1,
                                  reinterpret_cast<int* const*>(p + 2), nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                  0, 0, dlen2.get(), doff2.get()};
    kivi_rows.kivi = {hd, bits, G, R, cuda::KeyFormat::F32, capacity / G + 1, p + 3, p + 4,
                      reinterpret_cast<const int* const*>(p + 5), p + 6, p + 7, dcoded2.get()};
    kivi_rows.code_capacity = code_capacity;
    const int entries = out[0] + out[1];
    DeviceBuffer<float> dkeys(size_t(entries) * hd), dvalues(size_t(entries) * hd);
    cuda::cachedRows(kivi_rows, hd, dkeys.get(), dvalues.get());
    const auto keys = dkeys.download(), values = dvalues.download();
    for (int h = 0; h < H; ++h) {
      std::vector<float> scratch;
      const kv::HeadRows r = cpu.rows(0, h, scratch);
      const size_t first = size_t(offsets_after[h]) * hd, count = size_t(lengths_after[h]) * hd;
      EXPECT_TRUE(std::equal(&keys[first], &keys[first] + count, r.keys)) << "head " << h << ": keys";
      EXPECT_TRUE(std::equal(&values[first], &values[first] + count, r.values)) << "head " << h << ": values";
    }
  }
}

TEST(CudaKernels, KiviCompactionThinsRunsAsTheCpuDoes) {
  REQUIRE_GPU();
  kiviCompactionThinsRunsAsTheCpuDoes<float>();
}

TEST(CudaKernels, KiviCompactionMovesFp16Pairs) {
  REQUIRE_GPU();
  kiviCompactionThinsRunsAsTheCpuDoes<__half>();
}

// The row-scored methods' keys (cuda::evictionKeys) against kv/scorers.cpp over the same fp32
// rows, past holes: the device does the CPU's operations in the CPU's order, so the keys agree to
// the last bits (the engine's rows differ from the CPU's in theirs, and under eviction a swap at
// the budget's boundary compounds: CUR's windows and LagKV's partitions shift — this pins the
// arithmetic where the engine test cannot).
TEST(CudaKernels, RowScoresMatchTheCpuPastHoles) {
  REQUIRE_GPU();
  const int H = 2, hd = 16, capacity = 64, n = 58, sinks = 2;
  const std::vector<std::vector<int>> holes = {{3, 17, 18, 40}, {0, 9, 10, 11, 30, 31, 57}};
  const auto K = randn(size_t(H) * capacity * hd), V = randn(K.size()), filters = randn(size_t(H) * hd);
  std::vector<int> pos(size_t(H) * capacity, cuda::kEvicted), offsets, lengths;
  for (int h = 0; h < H; ++h) {
    for (int i = 0; i < n; ++i)
      if (!std::count(holes[h].begin(), holes[h].end(), i)) pos[size_t(h) * capacity + i] = i;
    offsets.push_back(h * n), lengths.push_back(n);
  }
  DeviceBuffer<float> dK(K), dV(V), dfilters(filters);
  DeviceBuffer<int> dpos(pos), doff(offsets), dlen(lengths), dslots(size_t(H) * n);
  DeviceBuffer<double> dtable(size_t(H) * n), dsums(size_t(4) * H * n);
  DeviceBuffer<void*> ptrs(std::vector<void*>{dK.get(), dV.get(), dpos.get()});
  void** p = ptrs.get();
  const cuda::EvictionCache rows{1, H, capacity, int(hd * sizeof(float)), cuda::KeyFormat::F32, p, p + 1,
                                 reinterpret_cast<int* const*>(p + 2), nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                 0, 0, dlen.get(), doff.get()};
  struct Case {
    const char* name;
    cuda::EvictScore method;
    int local;
  };
  for (const Case& m : {Case{"knorm", cuda::EvictScore::KeyNorm, 0}, Case{"keydiff", cuda::EvictScore::KeyDiff, 0},
                        Case{"qfilters", cuda::EvictScore::QueryFilter, 0}, Case{"lagkv", cuda::EvictScore::Lag, 0},
                        Case{"cur local=16", cuda::EvictScore::CUR, 16}, Case{"cur local=0", cuda::EvictScore::CUR, 0},
                        Case{"cur local=5", cuda::EvictScore::CUR, 5}}) {
    cuda::ScoreInputs in;
    in.query_filters = dfilters.get(), in.lag = 8, in.local = m.local;
    in.row_sums = dsums.get(), in.entry_slots = dslots.get();
    const int protected_below = m.method == cuda::EvictScore::Lag ? sinks : 0;
    cuda::evictionKeys(rows, m.method, 0, 0, protected_below, 0, 1 << 20, dtable.get(), in);
    const auto table = dtable.download();
    for (int h = 0; h < H; ++h) {
      std::vector<float> k, v;
      std::vector<int> slots;
      for (int i = 0; i < n; ++i) {
        const size_t at = size_t(h) * capacity + i;
        if (pos[at] == cuda::kEvicted) continue;
        slots.push_back(i);
        k.insert(k.end(), &K[at * hd], &K[at * hd] + hd), v.insert(v.end(), &V[at * hd], &V[at * hd] + hd);
      }
      const int entries = int(slots.size());
      std::vector<double> cpu(slots.size());
      const kv::HeadRows r{k.data(), v.data()};
      switch (m.method) {
        case cuda::EvictScore::KeyNorm: kv::keyNormScores(r, entries, hd, cpu.data()); break;
        case cuda::EvictScore::KeyDiff: kv::keyDiffScores(r, entries, hd, cpu.data()); break;
        case cuda::EvictScore::QueryFilter:
          kv::queryFilterScores(r, entries, hd, &filters[size_t(h) * hd], cpu.data());
          break;
        case cuda::EvictScore::Lag: kv::lagScores(r, entries, hd, sinks, 8, cpu.data()); break;
        default: kv::curScores(r, entries, hd, m.local, cpu.data()); break;
      }
      for (int i = 0; i < n; ++i)
        if (std::count(holes[h].begin(), holes[h].end(), i)) EXPECT_EQ(table[size_t(h) * n + i], -INFINITY) << m.name;
      for (int e = 0; e < entries; ++e) {
        if (m.method == cuda::EvictScore::Lag && slots[e] < sinks) continue;  // protected: +inf on the device
        EXPECT_NEAR(table[size_t(h) * n + slots[e]], cpu[e], 1e-12 * std::abs(cpu[e]))
            << m.name << ", head " << h << ", entry " << e;
      }
    }
  }
}

// The prompt's decisions on the device against their CPU twins (kv/scorers.h), bit for bit: SnapKV's
// keys — the observation's probabilities (a fifth of them 0, as unseen keys are), ChunkKV's means
// (none, 4, 5), the max-pool of 7 (and of 1), the sinks and the recent window protected — and
// Scissorhands' history bits from the prompt's observed rows, the older entries' bits shifted on.
TEST(CudaKernels, PromptDecisionsMatchTheCpu) {
  REQUIRE_GPU();
  const int L = 2, H = 3, LH = L * H, capacity = 64, n = 53, rows = 5, fresh = 41, sinks = 2, recent = 6;
  std::mt19937 rng(11);
  std::vector<float> w(size_t(LH) * rows * n);
  for (float& x : w) x = rng() % 5 == 0 ? 0.0f : std::ldexp(float(rng() % 4096), -12);
  std::vector<int> pos(size_t(L) * H * capacity, cuda::kEvicted), offsets, lengths(LH, n);
  for (int lh = 0; lh < LH; ++lh) {
    offsets.push_back(lh * n);
    for (int i = 0; i < n; ++i) pos[size_t(lh) * capacity + i] = i;
  }
  std::vector<uint64_t> history(size_t(LH) * capacity);
  for (auto& b : history) b = (uint64_t(rng()) << 32) | rng();
  DeviceBuffer<float> dw(w);
  DeviceBuffer<int> dpos(pos), doff(offsets), dlen(lengths), dslots(size_t(LH) * n);
  DeviceBuffer<uint64_t> dhistory(history);
  DeviceBuffer<double> dtable(size_t(LH) * n);
  DeviceBuffer<void*> ptrs(std::vector<void*>{dpos.get(), dpos.get() + H * capacity});
  cuda::EvictionCache c{L, H, capacity, 4, cuda::KeyFormat::F32, nullptr, nullptr,
                        reinterpret_cast<int* const*>(ptrs.get()), nullptr, nullptr, nullptr, nullptr,
                        int64_t(H) * capacity, dw.get(), int64_t(H) * rows * n, int64_t(rows) * n, dlen.get(),
                        doff.get()};
  for (const int chunk : {1, 4, 5})
    for (const int pool : {7, 1}) {
      cuda::ScoreInputs in;
      in.chunk = chunk, in.pool = pool, in.entry_slots = dslots.get();
      cuda::evictionKeys(c, cuda::EvictScore::SnapKV, n, 0, sinks, recent, n - 1, dtable.get(), in);
      const auto table = dtable.download();
      for (int lh = 0; lh < LH; ++lh) {
        std::vector<double> key(w.begin() + int64_t(lh) * rows * n, w.begin() + int64_t(lh) * rows * n + n);
        if (chunk > 1) kv::chunkMeans(key, chunk);
        kv::maxPool(key, pool);
        for (int i = 0; i < n; ++i) {
          const double want = i < sinks || i > n - 1 - recent ? INFINITY : key[i];
          ASSERT_EQ(table[size_t(lh) * n + i], want) << "chunk " << chunk << ", pool " << pool << ", head " << lh
                                                     << ", entry " << i;
        }
      }
    }
  c.history = dhistory.get();
  cuda::promptHistory(c, fresh, rows, n);
  const auto bits = dhistory.download();
  for (int lh = 0; lh < LH; ++lh) {
    std::vector<uint64_t> cpu(history.begin() + int64_t(lh) * capacity, history.begin() + int64_t(lh) * capacity + n);
    std::fill(cpu.end() - fresh, cpu.end(), 0);
    for (int t = 0; t < rows; ++t) kv::appendHistoryBits(&w[(size_t(lh) * rows + t) * n], n, cpu.data());
    for (int i = 0; i < n; ++i) ASSERT_EQ(bits[size_t(lh) * capacity + i], cpu[i]) << "head " << lh << ", entry " << i;
  }
}

// KIVI's decode attention (kernels/cuda/kivi_attention.cuh) over heads that eviction thinned,
// against the attention over their decoded rows in double: a head whose runs keep every row, one
// keeping about a fifth of each run's (some runs none: their indices skipped), one keeping a row
// of each run (a new run every row), one with holes and rows the query does
// not see; each with rows in the ring at full precision, and the probabilities an eviction policy
// reads. Groups of 32 and 8 (a value pair a lane's channels, or one a channel), 1, 2 and 8 query
// heads a KV head; fp32 caches (the CPU's arithmetic) and fp16 (half2 sums).
template <class OT>
void kiviAttentionOverThinnedRuns() {
  using Pair = cuda::AffinePair<OT>;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  constexpr int ring_count = 17;
  for (int bits : {2, 4})
  for (int hd : {64, 128})
  for (int group : {32, 8})
  for (auto [heads, H] : {std::pair{4, 4}, {8, 4}, {8, 1}}) {
    cuda::KiviCache<OT> kivi{};  // its shape now, its device arrays once they are filled
    kivi.head_dim = hd, kivi.bits = bits, kivi.group = group;
    const int cb = kivi.codeBytes(), vg = kivi.valueGroups(), ring_rows = 64, p = 1000000;
    kivi.ring.rows = ring_rows, kivi.ring.head_dim = hd;
    // Each head's coded rows: their runs and positions (holes: kEvicted; past the query: p + 1 on).
    std::vector<std::vector<int>> run(H), pos(H);
    for (int h = 0; h < H; ++h) {
      const int kind = h == 0 && H == 1 ? 1 : h % 4;
      for (int r = 0, at = 0; r < (kind == 2 ? 2500 : 300); ++r)
        for (int i = 0; i < group; ++i, ++at) {
          const bool kept = kind == 0 || (kind == 2 ? i == r % group : unit(rng) < 0.2f);
          if (!kept) continue;
          const float u = kind == 3 ? unit(rng) : 1.0f;
          run[h].push_back(r);
          pos[h].push_back(u < 0.05f ? cuda::kEvicted : u < 0.1f ? p + 1 + at : at);
        }
    }
    int capacity = 0, key_groups = 0;
    for (int h = 0; h < H; ++h) {
      capacity = std::max(capacity, int(run[h].size()) + ring_count);
      key_groups = std::max(key_groups, run[h].back() + 1);
    }
    std::vector<uint8_t> K(size_t(H) * capacity * cb), V(K.size());
    for (auto& b : K) b = uint8_t(byte(rng));
    for (auto& b : V) b = uint8_t(byte(rng));
    std::vector<Pair> kp(size_t(H) * key_groups * hd), vp(size_t(H) * capacity * vg);
    for (auto& a : kp) a = Pair::rounded(unit(rng) * 2 - 1, 0.05f + 0.3f * unit(rng));
    for (auto& a : vp) a = Pair::rounded(unit(rng) * 2 - 1, 0.05f + 0.3f * unit(rng));
    const auto ring_k = randn(size_t(H) * ring_rows * hd), ring_v = randn(ring_k.size()), q = randn(size_t(heads) * hd);
    std::vector<int> k_pos(size_t(H) * capacity, 0), runs(size_t(H) * capacity, 0), quantized(H), lengths(H);
    for (int h = 0; h < H; ++h) {
      quantized[h] = int(run[h].size()), lengths[h] = quantized[h] + ring_count;
      std::copy(run[h].begin(), run[h].end(), &runs[size_t(h) * capacity]);
      std::copy(pos[h].begin(), pos[h].end(), &k_pos[size_t(h) * capacity]);
      for (int l = quantized[h]; l < lengths[h]; ++l) k_pos[size_t(h) * capacity + l] = p - (lengths[h] - l);
    }
    // Row l of head h decoded as the device stores it (its pairs rounded to OT).
    auto row = [&](int h, int l, int c, bool key) -> double {
      if (l >= quantized[h]) {
        const size_t at = size_t(kivi.ring.at(h, l)) + c;
        return key ? cuda::toFloat(cuda::fromFloat<OT>(ring_k[at])) : cuda::toFloat(cuda::fromFloat<OT>(ring_v[at]));
      }
      const float2 a = key ? kp[(size_t(h) * key_groups + run[h][l]) * hd + c].get()
                           : vp[(size_t(h) * capacity + l) * vg + c / group].get();
      return double(a.x) + double(kivi.code(&(key ? K : V)[(size_t(h) * capacity + l) * cb], c)) * a.y;
    };
    const int G = heads / H;
    const double scale = 1.0 / std::sqrt(double(hd));
    std::vector<float> want(size_t(heads) * hd), want_w(size_t(H) * capacity, 0.0f);
    for (int hq = 0; hq < heads; ++hq) {
      const int h = hq / G;
      std::vector<double> s(lengths[h], -INFINITY);
      double top = -INFINITY, sum = 0;
      for (int l = 0; l < lengths[h]; ++l) {
        if (k_pos[size_t(h) * capacity + l] > p) continue;
        double d = 0;
        for (int c = 0; c < hd; ++c) d += double(q[size_t(hq) * hd + c]) * row(h, l, c, true);
        s[l] = d * scale, top = std::max(top, s[l]);
      }
      for (double& x : s) x = std::exp(x - top), sum += x;
      for (int l = 0; l < lengths[h]; ++l) {
        want_w[size_t(h) * capacity + l] += float(s[l] / sum);
        for (int c = 0; c < hd; ++c) want[size_t(hq) * hd + c] += float(s[l] / sum * row(h, l, c, false));
      }
    }
    std::vector<OT> rk(ring_k.size()), rv(ring_v.size());
    for (size_t i = 0; i < rk.size(); ++i) rk[i] = cuda::fromFloat<OT>(ring_k[i]), rv[i] = cuda::fromFloat<OT>(ring_v[i]);
    DeviceBuffer<uint8_t> dK(K), dV(V);
    DeviceBuffer<Pair> dkp(kp), dvp(vp);
    DeviceBuffer<OT> drk(rk), drv(rv), dout(size_t(heads) * hd);
    DeviceBuffer<int> dpos(k_pos), drun(runs), dq8(quantized), dlen(lengths), dqpos(std::vector<int>{p});
    DeviceBuffer<float> dq(q), dw(std::vector<float>(want_w.size(), 0.0f));
    kivi.K = dK.get(), kivi.V = dV.get();
    kivi.k_params = dkp.get(), kivi.v_params = dvp.get(), kivi.ring.k = drk.get(), kivi.ring.v = drv.get();
    kivi.k_pos = dpos.get(), kivi.capacity = kivi.pos_capacity = capacity, kivi.quantized = dq8.get();
    kivi.quantized_after = dq8.get(), kivi.key_groups = key_groups, kivi.run = drun.get();
    cuda::attention<uint8_t, OT>(dq.get(), heads * hd, dqpos.get(), 1, heads, dK.get(), dV.get(), dpos.get(), capacity,
                                 H, hd, 0, float(scale), dout.get(), dlen.get(), capacity, dw.get(), nullptr, false, &kivi);
    const double tol = std::is_same_v<OT, float> ? 1e-4 : 1e-2;
    const std::string what = "bits " + std::to_string(bits) + " head_dim " + std::to_string(hd) + " group " +
                             std::to_string(group) + " heads " + std::to_string(heads) + " / " + std::to_string(H);
    EXPECT_LE(relError(floatsOf(dout), want), tol) << what;
    EXPECT_LE(relError(dw.download(), want_w), tol) << what << ": probabilities";
  }
}

TEST(CudaKernels, KiviAttentionOverThinnedRunsMatchesItsDecodedRows) {
  REQUIRE_GPU();
  kiviAttentionOverThinnedRuns<float>();
  kiviAttentionOverThinnedRuns<__half>();
}

// A ring resized keeps each head's full-precision rows [coded, length): row l from l % 5 to l % 12.
TEST(CudaKernels, RingResizeMovesEachHeadsRows) {
  REQUIRE_GPU();
  const int heads = 3, hd = 8, from_rows = 5, to_rows = 12;
  const std::vector<int> coded = {0, 7, 20}, length = {4, 12, 20};
  const auto k = randn(size_t(heads) * from_rows * hd), v = randn(k.size());
  DeviceBuffer<float> dk(k), dv(v), tk(poisoned(size_t(heads) * to_rows * hd)), tv(poisoned(size_t(heads) * to_rows * hd));
  DeviceBuffer<int> dc(coded), dl(length);
  cuda::ringResize(dk.get(), dv.get(), from_rows, tk.get(), tv.get(), to_rows, heads, int(hd * sizeof(float)), dc.get(), dl.get());
  const auto gk = tk.download(), gv = tv.download();
  for (int h = 0; h < heads; ++h)
    for (int l = coded[h]; l < length[h]; ++l)
      for (int d = 0; d < hd; ++d) {
        EXPECT_EQ(gk[(size_t(h) * to_rows + l % to_rows) * hd + d], k[(size_t(h) * from_rows + l % from_rows) * hd + d]);
        EXPECT_EQ(gv[(size_t(h) * to_rows + l % to_rows) * hd + d], v[(size_t(h) * from_rows + l % from_rows) * hd + d]);
      }
}

}  // namespace
}  // namespace kvtp
