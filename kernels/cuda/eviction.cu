// Eviction on the device (eviction.h): keys, the decision by a stable radix sort, compaction.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

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
  const float* w = c.weights ? c.weights + row : nullptr;
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
    keys[i] = p < sinks || p > last_pos - recent ? INFINITY
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
  keep[entries[k]] = k - pool_begin[lo] < budget[lo] || isinf(keys[k]);
}

// One block per (layer, head). The kept entries' new slots come from a block-wide scan of the
// keep flags, 256 entries at a time; rows then move down in sub-chunks whose reads all finish
// before any write (a row can land where a later row of the same sub-chunk was; never where a
// later sub-chunk's row is, since every row moves down and order is kept). WPL: 4-byte words
// of a row per lane (a warp moves one row at a time), E rows per warp per sub-chunk.
template <int WPL>
__global__ void __launch_bounds__(kThreadsPerHead) compactKernel(EvictionCache c, const uint8_t* keep, int* new_length) {
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
  if (threadIdx.x == 0) new_length[lh] = kept_before;
}

}  // namespace

void evictionKeys(const EvictionCache& c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                  int last_pos, double* table) {
  keysKernel<<<c.layers * c.heads, kThreadsPerHead>>>(c, method, fresh, history_mask, sinks, recent, last_pos, table);
  KVTP_CUDA_LAUNCHED();
}

void evictionDecide(const double* table, int64_t n, const int64_t* pool_begin, const int64_t* budget, int pools,
                    uint8_t* keep) {
  if (n == 0) return;
  if (n > INT32_MAX) throw std::runtime_error("evictionDecide: more than 2^31 cache entries");
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
  // Descending and stable: equal keys keep table order, the host's tie-break. One pool sorts
  // device-wide; several (per layer / per head) as segments.
  size_t bytes = 0;
  auto sort = [&](void* storage) {
    if (pools == 1)
      return cub::DeviceRadixSort::SortPairsDescending(storage, bytes, table, keys_out, ids, ids_out, n);
    return cub::DeviceSegmentedRadixSort::SortPairsDescending(storage, bytes, table, keys_out, ids, ids_out, n, pools,
                                                              d_args, d_args + 1);
  };
  KVTP_CUDA_CHECK(sort(nullptr));
  KVTP_CUDA_CHECK(sort(grow(temp, bytes)));
  markKernel<<<blocksFor(n), kThreads>>>(keys_out, ids_out, n, d_args, pools, d_args + pools + 1, keep);
  KVTP_CUDA_LAUNCHED();
}

void evictionCompact(const EvictionCache& c, const uint8_t* keep, int* new_length) {
  const int words = c.row_bytes / 4, blocks = c.layers * c.heads;
  if (c.row_bytes % 4 || words > 256) throw std::runtime_error("evictionCompact: rows of 4 to 1024 bytes, whole words");
  if (words <= 32) compactKernel<1><<<blocks, kThreadsPerHead>>>(c, keep, new_length);
  else if (words <= 64) compactKernel<2><<<blocks, kThreadsPerHead>>>(c, keep, new_length);
  else if (words <= 128) compactKernel<4><<<blocks, kThreadsPerHead>>>(c, keep, new_length);
  else compactKernel<8><<<blocks, kThreadsPerHead>>>(c, keep, new_length);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
