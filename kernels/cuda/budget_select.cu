// The budget's decision on the device (eviction.h's evictionDecide): kv::selectBudget's radix
// select (kernels/radix_select.h) over every pool at once, its histograms summed over the ranks
// between passes, then the ties shared out in table order and each head's kept entries marked.
#include <cub/block/block_scan.cuh>

#include <functional>

#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/eviction.h"

namespace kvtp::cuda {
namespace {

using kernels::orderedKey;
using kernels::RadixSelect;

constexpr int kThreadsPerHead = 256;  // a block per (layer, head), as the keys' kernels

// A pool whose threshold is known: every byte found (after the last pass, or once the keys under
// its prefix were seen to be one key: the passes left would only find that key's bytes).
__device__ bool settled(const RadixSelect& sel) { return sel.done || sel.mask == ~0ull; }

__device__ inline unsigned long long warpMin(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline unsigned long long warpMax(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One block per (layer, head) of this rank: the byte at `shift` of each key still under its
// pool's prefix, counted into the pool's histogram (doubles: what the ranks all-reduce); and, with
// `range` (one rank), the least and greatest such key into the pool's (lo, hi) pair.
__global__ void byteHistogram(const double* table, EvictionCache c, SelectLayout s, const RadixSelect* select,
                              int shift, double* hist, unsigned long long* range) {
  const int lh = blockIdx.x, p = s.pool_of[s.head_table[lh]], n = c.length[lh];
  const RadixSelect sel = select[p];
  if (settled(sel)) return;
  __shared__ unsigned local[256];
  for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const double* keys = table + c.table_offset[lh];
  unsigned long long lo = ~0ull, hi = 0;
  const int lane = threadIdx.x % 32;
  // A warp's lanes with the same byte add once (the keys of a pass crowd into few bytes — the
  // threshold's neighbours, Scissorhands' counts — and a shared counter takes its adds one at a time).
  for (int warp_first = threadIdx.x - lane; warp_first < n; warp_first += blockDim.x) {
    const int i = warp_first + lane;
    const uint64_t u = i < n ? orderedKey(keys[i]) : 0;
    const bool counted = i < n && sel.under(u);
    const unsigned byte = counted ? unsigned(u >> shift) & 255 : 256;
    const unsigned peers = __match_any_sync(0xffffffffu, byte);
    if (counted) {
      if (lane == __ffs(peers) - 1) atomicAdd(&local[byte], unsigned(__popc(peers)));
      lo = min(lo, (unsigned long long)u), hi = max(hi, (unsigned long long)u);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[p * 256 + b], double(local[b]));
  if (!range) return;
  lo = blockReduce(lo, [](unsigned long long v) { return warpMin(v); }, ~0ull);
  hi = blockReduce(hi, [](unsigned long long v) { return warpMax(v); }, 0ull);
  if (threadIdx.x == 0 && lo <= hi) atomicMin(&range[2 * p], lo), atomicMax(&range[2 * p + 1], hi);
}

__global__ void startSelect(RadixSelect* select, const int64_t* budget, int pools, unsigned long long* range) {
  for (int p = threadIdx.x; p < pools; p += blockDim.x) {
    select[p] = RadixSelect::start(budget[p]);
    if (range) range[2 * p] = ~0ull, range[2 * p + 1] = 0;
  }
}

// Each pool fixes the pass's byte from its histogram (summed over the ranks), then clears it:
// one block a pool, RadixSelect::pick's byte found by a scan over the 256 counts, highest byte
// first (one thread walking them in global memory waited out one load after another, ~14 us a
// pass, eight passes a decision), the counts zeroed for the next pass. Thread j holds byte
// 255 - j; the byte picked is the first whose count, with those above it, reaches r. With `range`:
// where the keys this pass counted were one key, that key is the threshold (the passes left skip
// the pool: an integer key — Scissorhands' count of bits — is found in three passes of eight).
__global__ void __launch_bounds__(256) pickByte(RadixSelect* select, int shift, double* hist,
                                                unsigned long long* range) {
  using Scan = cub::BlockScan<int64_t, 256>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int64_t above_of[256], lowest_count;
  __shared__ int first;
  double* h = hist + int64_t(blockIdx.x) * 256;
  const int j = threadIdx.x;
  const int64_t count = int64_t(h[255 - j]);
  h[255 - j] = 0;
  RadixSelect sel = select[blockIdx.x];
  int64_t above = 0, total = 0;
  Scan(scan).ExclusiveSum(count, above, total);
  above_of[j] = above;
  if (j == 255) lowest_count = count;  // byte 0: the holes (-inf) in the first pass
  if (j == 0) first = 255;             // no byte reaches r: byte 0
  __syncthreads();
  if (settled(sel)) return;
  if (shift == 56) {  // r between the protected keys (+inf, byte 255: thread 0's) and the entries
    const int64_t protect = above_of[1], entries = total - lowest_count;
    sel.r = sel.r < protect ? protect : sel.r > entries ? entries : sel.r;
  }
  if (sel.r > 0 && above < sel.r && above + count >= sel.r) atomicMin(&first, j);
  __syncthreads();
  if (j != 0) return;
  if (sel.r == 0) {
    sel.done = 1;
  } else {
    sel.r -= above_of[first];
    sel.prefix |= uint64_t(255 - first) << shift, sel.mask |= uint64_t(255) << shift;
  }
  if (range) {
    unsigned long long* lo_hi = range + 2 * blockIdx.x;
    if (!sel.done && lo_hi[0] == lo_hi[1]) sel.prefix = lo_hi[0], sel.mask = ~0ull;  // (r: its rank among them)
    lo_hi[0] = ~0ull, lo_hi[1] = 0;
  }
  select[blockIdx.x] = sel;
}

// Per (layer, head) of this rank: how many of its keys equal its pool's threshold, at its table
// head's place (the other ranks' places stay 0 for the all-reduce).
__global__ void countEqual(const double* table, EvictionCache c, SelectLayout s, const RadixSelect* select,
                           double* equal) {
  const int lh = blockIdx.x, t = s.head_table[lh], n = c.length[lh];
  const uint64_t threshold = select[s.pool_of[t]].threshold();
  const double* keys = table + c.table_offset[lh];
  float count = 0.0f;  // exact below 2^24
  for (int i = threadIdx.x; i < n; i += blockDim.x) count += orderedKey(keys[i]) == threshold ? 1.0f : 0.0f;
  count = blockReduce(count, warpSum, 0.0f);
  if (threadIdx.x == 0) equal[t] = count;
}

// One block a pool: tieQuotas' shares — each of the pool's table heads (a contiguous range, found
// by binary search in pool_of) keeps min(its equal keys, what the heads before it left of r) —
// from a scan over the heads, 256 at a time (one thread walking every head took ~150 us a step).
__global__ void __launch_bounds__(256) shareTies(const double* equal, SelectLayout s, const RadixSelect* select,
                                                 int64_t* quota) {
  using Scan = cub::BlockScan<int64_t, 256>;
  __shared__ typename Scan::TempStorage scan;
  const int pool = blockIdx.x;
  auto lowerBound = [&](int value) {  // the first table head whose pool is at least `value`
    int lo = 0, hi = s.table_heads;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (s.pool_of[mid] < value) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  const int begin = lowerBound(pool), end = lowerBound(pool + 1);
  const int64_t r = select[pool].done ? 0 : select[pool].r;
  int64_t carry = 0;  // equal keys of the pool's heads before this chunk
  for (int t0 = begin; t0 < end; t0 += blockDim.x) {
    const int t = t0 + threadIdx.x;
    const int64_t n = t < end ? int64_t(equal[t]) : 0;
    int64_t before = 0, chunk = 0;
    Scan(scan).ExclusiveSum(n, before, chunk);
    __syncthreads();  // the scan's storage is reused
    const int64_t left = r - carry - before;
    if (t < end) quota[t] = left <= 0 ? 0 : n < left ? n : left;
    carry += chunk;
  }
}

// Per (layer, head): keys above the threshold are kept, and the head's first quota keys equal to
// it (their rank among the head's equal keys from a block-wide scan, 256 entries at a time).
__global__ void __launch_bounds__(kThreadsPerHead) markKept(const double* table, EvictionCache c, SelectLayout s,
                                                            const RadixSelect* select, const int64_t* quota,
                                                            uint8_t* keep) {
  using Scan = cub::BlockScan<int, kThreadsPerHead>;
  __shared__ typename Scan::TempStorage scan;
  const int lh = blockIdx.x, t = s.head_table[lh], n = c.length[lh];
  const uint64_t threshold = select[s.pool_of[t]].threshold();
  const int64_t ties = quota[t];
  const double* keys = table + c.table_offset[lh];
  uint8_t* out = keep + c.table_offset[lh];
  int64_t equal_before = 0;
  for (int c0 = 0; c0 < n; c0 += kThreadsPerHead) {
    const int i = c0 + threadIdx.x;
    const uint64_t u = i < n ? orderedKey(keys[i]) : 0;
    const int equal = i < n && u == threshold;
    int before = 0, total = 0;
    Scan(scan).ExclusiveSum(equal, before, total);
    if (i < n) out[i] = u > threshold || (equal && equal_before + before < ties);
    equal_before += total;
    __syncthreads();  // the scan's storage is reused
  }
}

}  // namespace

// kv::selectBudget's decision (kv/budget_select.h) on the device: eight passes of a radix
// select, each pool's histogram summed over the ranks by `sum_over_ranks` between the counting
// and the pick, then the keys equal to each pool's threshold shared out in table order. The state
// stays in device memory, so the host waits for nothing inside the decision.
void evictionDecide(const EvictionCache& c, const double* table, const SelectLayout& s,
                    const std::function<void(double*, size_t)>& sum_over_ranks, uint8_t* keep) {
  static thread_local DeviceBuffer<RadixSelect> state;
  static thread_local DeviceBuffer<double> sums;
  static thread_local DeviceBuffer<int64_t> quotas;
  static thread_local DeviceBuffer<unsigned long long> ranges;
  const int heads = c.layers * c.heads;
  RadixSelect* select = grow(state, size_t(s.pools));
  // One rank: each pool's key range under its prefix, to stop a pool once its keys there are one
  // (the same threshold as the passes left would find). Over ranks the sums alone are reduced.
  unsigned long long* range = sum_over_ranks ? nullptr : grow(ranges, 2 * size_t(s.pools));
  double* hist = grow(sums, size_t(s.pools) * 256 + s.table_heads);
  double* equal = hist + size_t(s.pools) * 256;
  int64_t* quota = grow(quotas, size_t(s.table_heads));
  KVTP_CUDA_CHECK(cudaMemsetAsync(hist, 0, (size_t(s.pools) * 256 + s.table_heads) * sizeof(double),
                                  cudaStreamPerThread));
  startSelect<<<1, 256>>>(select, s.budget, s.pools, range);
  KVTP_CUDA_LAUNCHED();
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (s.counted) byteHistogram<<<heads, kThreadsPerHead>>>(table, c, s, select, shift, hist, range);
    KVTP_CUDA_LAUNCHED();
    if (sum_over_ranks) sum_over_ranks(hist, size_t(s.pools) * 256);
    pickByte<<<s.pools, 256>>>(select, shift, hist, range);
    KVTP_CUDA_LAUNCHED();
  }
  if (s.counted) countEqual<<<heads, kThreadsPerHead>>>(table, c, s, select, equal);
  KVTP_CUDA_LAUNCHED();
  if (sum_over_ranks) sum_over_ranks(equal, size_t(s.table_heads));
  shareTies<<<s.pools, 256>>>(equal, s, select, quota);
  KVTP_CUDA_LAUNCHED();
  markKept<<<heads, kThreadsPerHead>>>(table, c, s, select, quota, keep);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
