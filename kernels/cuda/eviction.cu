// Eviction on the device (eviction.h): keys; the decision by a radix select (one pool) or a
// stable segmented radix sort (a pool per layer or head); holes, then compaction.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/eviction.h"

namespace kvtp::cuda {
namespace {

constexpr int kThreadsPerHead = 256;

// One block per (layer, head): Scissorhands first counts the keys this step's query saw (its
// average is 1 / visible), then every entry is scored and keyed as kv::Policy::score / evict do —
// the same float and double operations, so the same keys.
__global__ void keysKernel(EvictionCache c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                           int last_pos, double* table) {
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh];
  const int64_t row = l * c.layer_stride + h * c.capacity;
  const float* w = c.weights ? c.weights + l * c.weights_layer + h * c.weights_head : nullptr;
  double* score = c.score ? c.score + row : nullptr;
  uint64_t* history = c.history ? c.history + row : nullptr;
  const int* pos = c.pos[l] + h * c.capacity;
  double* keys = table + c.table_offset[lh];
  float visible = 0.0f;
  if (method == EvictScore::Scissorhands && w) {
    float count = 0.0f;  // exact: counts stay far below 2^24
    for (int i = threadIdx.x; i < n; i += blockDim.x) count += w[i] > 0.0f ? 1.0f : 0.0f;
    visible = blockReduce(count, warpSum, 0.0f);
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const bool is_new = i >= n - fresh;
    const float wi = w ? w[i] : 0.0f;
    double s = 0.0;
    if (score) {
      s = (is_new ? 0.0 : score[i]) + double(wi);
      score[i] = s;
    }
    uint64_t bits = 0;
    if (history) {
      bits = is_new ? 0 : history[i];
      if (wi > 0.0f) bits = (bits << 1) | (wi * visible > 1.0f ? 1u : 0u);
      history[i] = bits;
    }
    const int p = pos[i];
    keys[i] = p == kEvicted                      ? -INFINITY
              : p < sinks || p > last_pos - recent ? INFINITY
              : method == EvictScore::H2O        ? s
              : method == EvictScore::StreamingLLM ? double(p)
                                                   : double(__popcll(bits & history_mask));
  }
}

__global__ void iotaKernel(int* v, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) v[i] = int(i);
}

// Sorted position k of the table belongs to the pool whose run holds k (each pool sorted in
// place); it is kept while within the pool's budget, or when protected.
__global__ void markKernel(const double* keys, const int* entries, int64_t n, const int64_t* pool_begin, int pools,
                           const int64_t* budget, uint8_t* keep) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  int lo = 0, hi = pools - 1;  // the last pool whose begin <= k
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pool_begin[mid] <= k) lo = mid;
    else hi = mid - 1;
  }
  keep[entries[k]] = keys[k] == INFINITY || (k - pool_begin[lo] < budget[lo] && keys[k] != -INFINITY);
}

// A key as an unsigned integer of the same order (doubles: the sign bit flipped for positives,
// every bit for negatives), so a radix pass can bucket it by its bytes.
__device__ inline uint64_t ordered(double key) {
  const uint64_t u = __double_as_longlong(key);
  return u >> 63 ? ~u : u | (1ull << 63);
}

// The radix select's state between passes, on the device: no pass waits for the host.
struct SelectState {
  unsigned hist[256];     // this pass's histogram of the next byte
  uint64_t prefix, mask;  // the bytes of the r-th highest key found so far
  int64_t r;              // its rank among the keys under the prefix
  int done;               // r fell to 0: nothing is kept but the protected
  // Every key above `threshold` is kept, and the first r of those equal to it.
  __device__ uint64_t threshold() const { return r == 0 ? ~0ull : prefix; }
};

__global__ void startSelect(SelectState* s, int64_t budget) {
  s->hist[threadIdx.x] = 0;
  if (threadIdx.x == 0) s->prefix = s->mask = 0, s->r = budget, s->done = 0;
}

// The byte at `shift` of every key whose higher bytes equal the state's prefix (under its mask),
// counted into the state's histogram.
__global__ void byteHistogram(const double* keys, int64_t n, int shift, SelectState* s) {
  if (s->done) return;
  __shared__ unsigned local[256];
  const uint64_t prefix = s->prefix, mask = s->mask;
  for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t u = ordered(keys[i]);
    if ((u & mask) == prefix) atomicAdd(&local[(u >> shift) & 255], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x)
    if (local[b]) atomicAdd(&s->hist[b], local[b]);
}

// One thread: the byte at `shift` of the r-th highest key under the prefix, from the pass's
// histogram, which it clears for the next pass.
__global__ void pickByte(int64_t n, int shift, SelectState* s) {
  if (s->done) return;
  unsigned* h = s->hist;
  int64_t r = s->r;
  if (shift == 56)  // +inf's top byte is 0xff, -inf's (a hole's) 0x00; finite keys >= 0 lie between
    r = min(max(r, int64_t(h[255])), n - h[0]);
  if (r == 0) {
    s->r = 0, s->done = 1;
    return;
  }
  int b = 255;
  for (int64_t above = 0; b >= 0; --b) {
    if (above + h[b] >= r) {
      r -= above;
      break;
    }
    above += h[b];
  }
  s->prefix |= uint64_t(b) << shift, s->mask |= uint64_t(255) << shift, s->r = r;
  for (int i = 0; i < 256; ++i) h[i] = 0;
}

__global__ void equalFlags(const double* keys, int64_t n, const SelectState* s, int* flags) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) flags[i] = ordered(keys[i]) == s->threshold();
}

// The r highest keys: those above the threshold, then the first `ties` equal to it in table
// order (rank among the equal ones from an exclusive scan of their flags).
__global__ void markSelected(const double* keys, int64_t n, const SelectState* s, const int* tie_rank, uint8_t* keep) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t u = ordered(keys[i]), threshold = s->threshold();
  keep[i] = u > threshold || (u == threshold && tie_rank[i] < s->r);
}

// One block per (layer, head). Evicted entries become holes until holes pass an eighth of the
// slots; then the kept entries' new slots come from a block-wide scan of the
// keep flags, 256 entries at a time, and rows move down in sub-chunks whose reads all finish
// before any write (a row can land where a later row of the same sub-chunk was; never where a
// later sub-chunk's row is, since every row moves down and order is kept). WPL: 4-byte words
// of a row per lane (a warp moves one row at a time), E rows per warp per sub-chunk.
template <int WPL>
__global__ void __launch_bounds__(kThreadsPerHead) compactKernel(EvictionCache c, const uint8_t* keep, int* new_slots,
                                                                  int* kept) {
  constexpr int E = 8 / WPL, kWarps = kThreadsPerHead / 32, kSub = kWarps * E;
  using Scan = cub::BlockScan<int, kThreadsPerHead>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int dest[kThreadsPerHead];
  __shared__ int kept_before;
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh];
  const int words = c.row_bytes / 4, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t base = h * c.capacity, stat = l * c.layer_stride + base;
  uint32_t* K = static_cast<uint32_t*>(c.K[l]) + base * words;
  uint32_t* V = static_cast<uint32_t*>(c.V[l]) + base * words;
  int* pos = c.pos[l] + base;
  float* ks = c.k_step ? c.k_step[l] + base : nullptr;
  float* vs = c.v_step ? c.v_step[l] + base : nullptr;
  double* score = c.score ? c.score + stat : nullptr;
  uint64_t* history = c.history ? c.history + stat : nullptr;
  const uint8_t* flags = keep + c.table_offset[lh];
  float count = 0.0f;  // kept entries (exact in float below 2^24)
  for (int i = threadIdx.x; i < n; i += blockDim.x) count += flags[i] ? 1.0f : 0.0f;
  const int k = int(blockReduce(count, warpSum, 0.0f));
  if (threadIdx.x == 0) kept[lh] = k;
  if (8 * (n - k) <= n) {  // holes stay: mark this step's evictions
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      if (!flags[i] && pos[i] != kEvicted) pos[i] = kEvicted;
    if (threadIdx.x == 0) new_slots[lh] = n;
    return;
  }
  if (threadIdx.x == 0) kept_before = 0;
  __syncthreads();
  for (int c0 = 0; c0 < n; c0 += kThreadsPerHead) {
    const int i = c0 + threadIdx.x, flag = i < n && flags[i];
    int before = 0, total = 0;
    Scan(scan).ExclusiveSum(flag, before, total);
    const int first = kept_before;
    dest[threadIdx.x] = flag ? first + before : -1;
    __syncthreads();
    if (threadIdx.x == 0) kept_before = first + total;
    for (int s0 = 0; s0 < kThreadsPerHead && c0 + s0 < n; s0 += kSub) {
      uint32_t kr[E][WPL], vr[E][WPL];
      int from[E], to[E], p[E] = {};
      float kst[E] = {}, vst[E] = {};
      double sc[E] = {};
      uint64_t hi[E] = {};
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int j = s0 + warp * E + e;
        from[e] = c0 + j;
        to[e] = j < kThreadsPerHead && from[e] < n ? dest[j] : -1;
        if (to[e] == from[e]) to[e] = -1;  // stays where it is
        if (to[e] < 0) continue;
#pragma unroll
        for (int w = 0; w < WPL; ++w) {
          const int word = lane + 32 * w;
          if (word < words) kr[e][w] = K[int64_t(from[e]) * words + word], vr[e][w] = V[int64_t(from[e]) * words + word];
        }
        if (lane == 0) {
          p[e] = pos[from[e]];
          if (ks) kst[e] = ks[from[e]], vst[e] = vs[from[e]];
          if (score) sc[e] = score[from[e]];
          if (history) hi[e] = history[from[e]];
        }
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (to[e] < 0) continue;
#pragma unroll
        for (int w = 0; w < WPL; ++w) {
          const int word = lane + 32 * w;
          if (word < words) K[int64_t(to[e]) * words + word] = kr[e][w], V[int64_t(to[e]) * words + word] = vr[e][w];
        }
        if (lane == 0) {
          pos[to[e]] = p[e];
          if (ks) ks[to[e]] = kst[e], vs[to[e]] = vst[e];
          if (score) score[to[e]] = sc[e];
          if (history) history[to[e]] = hi[e];
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) new_slots[lh] = kept_before;
}

}  // namespace

void evictionKeys(const EvictionCache& c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                  int last_pos, double* table) {
  keysKernel<<<c.layers * c.heads, kThreadsPerHead>>>(c, method, fresh, history_mask, sinks, recent, last_pos, table);
  KVTP_CUDA_LAUNCHED();
}

namespace {

// One pool (the global budget): a radix select, not a sort — a step evicts about one entry a head
// of millions. Eight passes, a byte each from the top, find the r-th highest key (r: the budget,
// at least every +inf, at most every entry but the holes); keys above it are kept, and of those
// equal to it the first in table order (a scan of their flags), as the stable sort would. The
// passes hand their state on in device memory (the host choosing each byte cost eight round trips).
void selectTop(const double* table, int64_t n, int64_t budget, uint8_t* keep) {
  static thread_local DeviceBuffer<SelectState> state;
  static thread_local DeviceBuffer<int> ranks;
  static thread_local DeviceBuffer<char> temp;
  SelectState* s = grow(state, 1);
  const unsigned blocks = std::min<unsigned>(blocksFor(n), 4 * multiprocessors());
  startSelect<<<1, 256>>>(s, budget);
  KVTP_CUDA_LAUNCHED();
  for (int shift = 56; shift >= 0; shift -= 8) {
    byteHistogram<<<blocks, kThreads>>>(table, n, shift, s);
    pickByte<<<1, 1>>>(n, shift, s);
    KVTP_CUDA_LAUNCHED();
  }
  int* flags = grow(ranks, 2 * size_t(n));
  int* rank = flags + n;
  equalFlags<<<blocksFor(n), kThreads>>>(table, n, s, flags);
  KVTP_CUDA_LAUNCHED();
  size_t bytes = 0;
  KVTP_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, flags, rank, int(n)));
  KVTP_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(grow(temp, bytes), bytes, flags, rank, int(n)));
  markSelected<<<blocksFor(n), kThreads>>>(table, n, s, rank, keep);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace

void evictionDecide(const double* table, int64_t n, const int64_t* pool_begin, const int64_t* budget, int pools,
                    uint8_t* keep) {
  if (n == 0) return;
  if (n > INT32_MAX) throw std::runtime_error("evictionDecide: more than 2^31 cache entries");
  if (pools == 1) return selectTop(table, n, budget[0], keep);
  static thread_local DeviceBuffer<double> sorted;
  static thread_local DeviceBuffer<int> entries;
  static thread_local DeviceBuffer<int64_t> pool_args;
  static thread_local DeviceBuffer<char> temp;
  double* keys_out = grow(sorted, size_t(n));
  int* ids = grow(entries, 2 * size_t(n));
  int* ids_out = ids + n;
  iotaKernel<<<blocksFor(n), kThreads>>>(ids, n);
  KVTP_CUDA_LAUNCHED();
  // The pools' runs [begin, end) and budgets, uploaded once (pools + 1 begins, then budgets).
  std::vector<int64_t> args(pool_begin, pool_begin + pools + 1);
  args.insert(args.end(), budget, budget + pools);
  int64_t* d_args = grow(pool_args, args.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_args, args.data(), args.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  // Each pool's run sorted descending and stable: equal keys keep table order, the host's tie-break.
  size_t bytes = 0;
  auto sort = [&](void* storage) {
    return cub::DeviceSegmentedRadixSort::SortPairsDescending(storage, bytes, table, keys_out, ids, ids_out, int(n),
                                                              pools, d_args, d_args + 1);
  };
  KVTP_CUDA_CHECK(sort(nullptr));
  KVTP_CUDA_CHECK(sort(grow(temp, bytes)));
  markKernel<<<blocksFor(n), kThreads>>>(keys_out, ids_out, n, d_args, pools, d_args + pools + 1, keep);
  KVTP_CUDA_LAUNCHED();
}

void evictionCompact(const EvictionCache& c, const uint8_t* keep, int* new_slots, int* kept) {
  const int words = c.row_bytes / 4, blocks = c.layers * c.heads;
  if (c.row_bytes % 4 || words > 256) throw std::runtime_error("evictionCompact: rows of 4 to 1024 bytes, whole words");
  if (words <= 32) compactKernel<1><<<blocks, kThreadsPerHead>>>(c, keep, new_slots, kept);
  else if (words <= 64) compactKernel<2><<<blocks, kThreadsPerHead>>>(c, keep, new_slots, kept);
  else if (words <= 128) compactKernel<4><<<blocks, kThreadsPerHead>>>(c, keep, new_slots, kept);
  else compactKernel<8><<<blocks, kThreadsPerHead>>>(c, keep, new_slots, kept);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
