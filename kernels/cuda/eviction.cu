// Eviction on the device (eviction.h): keys; holes, then compaction; the prompt's Scissorhands
// bits and ThinK's, CriticalKV's and the mirror's helpers. The decision between them, the budget's
// select: budget_select.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/eviction.h"
#include "kernels/splitmix.h"

namespace kvtp::cuda {
namespace {

constexpr int kThreadsPerHead = 256;

__device__ int elementBytes(KeyFormat format) { return format == KeyFormat::F32 ? 4 : 2; }  // fp32, fp16, bf16

__device__ float widened(const void* row, KeyFormat format, int64_t d) {
  switch (format) {
    case KeyFormat::F16: return __half2float(static_cast<const __half*>(row)[d]);
    case KeyFormat::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(row)[d]);
    default: return static_cast<const float*>(row)[d];
  }
}

// Channel d of slot i's cached key (or value) as the CPU reads it: fp32/fp16/bf16 widened, an
// int8 code x step, or KIVI's code decoded as kv::Affine::decode (no fused multiply-add) or its
// ring row.
__device__ float cachedChannel(const EvictionCache& c, bool value, int l, int h, int i, int d) {
  const int64_t slot = h * c.rowStride() + i;
  const char* row = static_cast<const char*>(value ? c.V[l] : c.K[l]) + slot * c.row_bytes;
  if (c.key_format == KeyFormat::Int8)
    return __fmul_rn(float(reinterpret_cast<const int8_t*>(row)[d]), (value ? c.v_step : c.k_step)[l][slot]);
  if (c.key_format != KeyFormat::Kivi) return widened(row, c.key_format, d);
  const KiviRows& k = c.kivi;
  if (i >= k.coded[l * c.heads + h]) {
    const char* ring = static_cast<const char*>((value ? k.ring_v : k.ring_k)[l]) +
                       (int64_t(h) * k.ring_rows + i % k.ring_rows) * k.head_dim * elementBytes(k.ring_format);
    return widened(ring, k.ring_format, d);
  }
  const int code = (reinterpret_cast<const uint8_t*>(row)[d * k.bits / 8] >> (d * k.bits % 8)) & ((1 << k.bits) - 1);
  const int value_groups = (k.head_dim + k.value_group - 1) / k.value_group;
  const int64_t pair = value ? slot * value_groups + d / k.value_group
                             : (h * k.key_groups + k.run[l][slot]) * k.head_dim + d;
  const void* pairs = value ? k.v_params[l] : k.k_params[l];  // (lo, step): two ring_format elements
  const float lo = widened(pairs, k.ring_format, 2 * pair), step = widened(pairs, k.ring_format, 2 * pair + 1);
  return __fadd_rn(lo, __fmul_rn(float(code), step));
}

__device__ float cachedKey(const EvictionCache& c, int l, int h, int i, int d) {
  return cachedChannel(c, false, l, h, i, d);
}

__device__ int keyChannels(const EvictionCache& c) {
  return c.key_format == KeyFormat::Kivi  ? c.kivi.head_dim
         : c.key_format == KeyFormat::Int8 ? c.row_bytes
                                           : c.row_bytes / elementBytes(c.key_format);
}

// The squared norm of slot i's key or value in double, channel by channel as the CPU sums it.
__device__ double squaredNorm(const EvictionCache& c, bool value, int l, int h, int i) {
  double norm = 0.0;
  for (int d = 0, hd = keyChannels(c); d < hd; ++d) {
    const double x = cachedChannel(c, value, l, h, i, d);
    norm = __dadd_rn(norm, __dmul_rn(x, x));
  }
  return norm;
}

// Q-Filters (kv::queryFilterScores): k . filter in double, channel by channel as the CPU sums it.
__device__ double queryFilterKey(const EvictionCache& c, int l, int h, int i, const float* filter) {
  double dot = 0.0;
  for (int d = 0, hd = keyChannels(c); d < hd; ++d)
    dot = __dadd_rn(dot, __dmul_rn(double(cachedKey(c, l, h, i, d)), double(filter[d])));
  return dot;
}

// KeyDiff (kv::keyDiffScores) over a head's entries that are not holes, in the CPU's order of
// operations: each key's norm (into `keys` first, as scratch), the anchor — the mean of the
// normalized keys, a thread per channel summing the entries in order — and its norm, then
// -cos(k, anchor) per entry.
__device__ void keyDiffKeys(const EvictionCache& c, int l, int h, int n, const int* pos, double* keys) {
  __shared__ double anchor[256];
  __shared__ double anchor_norm;
  __shared__ int entries;
  const int hd = keyChannels(c);
  float count = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    count += pos[i] != kEvicted ? 1.0f : 0.0f;
    keys[i] = pos[i] != kEvicted ? sqrt(squaredNorm(c, false, l, h, i)) : 0.0;
  }
  const int length = int(blockReduce(count, warpSum, 0.0f));
  if (threadIdx.x == 0) entries = length;
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    double a = 0.0;
    for (int i = 0; i < n; ++i)
      if (pos[i] != kEvicted && keys[i] > 0)
        a = __dadd_rn(a, __ddiv_rn(__ddiv_rn(double(cachedKey(c, l, h, i, d)), keys[i]), double(entries)));
    anchor[d] = a;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sq = 0.0;
    for (int d = 0; d < hd; ++d) sq = __dadd_rn(sq, __dmul_rn(anchor[d], anchor[d]));
    anchor_norm = sqrt(sq);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (pos[i] == kEvicted) continue;
    double dot = 0.0;
    for (int d = 0; d < hd; ++d) dot = __dadd_rn(dot, __dmul_rn(double(cachedKey(c, l, h, i, d)), anchor[d]));
    keys[i] = keys[i] > 0 && anchor_norm > 0 ? -dot / __dmul_rn(keys[i], anchor_norm) : 0.0;
  }
  __syncthreads();
}

// LagKV's state score (kv::lagStateScores) of the keys or values of partition [begin, begin +
// lag) of a head's entries (slots[e]: entry e's slot) against the next partition's range per
// channel: a warp per partition, a lane per entry, channels in the CPU's order; the softmax's
// exponentials into `out`, their total returned (summed in entry order).
__device__ double lagState(const EvictionCache& c, bool value, int l, int h, const int* slots, int begin, int lag,
                           double* sums, double* out) {
  const int hd = keyChannels(c), lane = threadIdx.x % 32;
  double* mean = sums;
  double* sq = sums + lag;
  for (int i = lane; i < lag; i += 32) mean[i] = 0.0, sq[i] = 0.0;
  for (int d = 0; d < hd; ++d) {
    float lo = INFINITY, hi = -INFINITY;
    for (int r = lane; r < lag; r += 32) {
      const float x = cachedChannel(c, value, l, h, slots[begin + lag + r], d);
      lo = fminf(lo, x), hi = fmaxf(hi, x);
    }
    for (int o = 16; o > 0; o >>= 1)
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o)), hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    const double range = double(hi) - double(lo);
    for (int i = lane; i < lag; i += 32) {
      const float x = cachedChannel(c, value, l, h, slots[begin + i], d);
      const double t = range > 0 ? double(__fsub_rn(x, lo)) / range : 0.0;
      mean[i] = __dadd_rn(mean[i], t), sq[i] = __dadd_rn(sq[i], __dmul_rn(t, t));
    }
  }
  double top = -INFINITY;
  for (int i = lane; i < lag; i += 32) {
    const double m = mean[i] / hd;
    out[i] = hd > 1 ? sqrt(fmax(0.0, (sq[i] - __dmul_rn(__dmul_rn(double(hd), m), m)) / (hd - 1))) : 0.0;
    top = fmax(top, out[i]);
  }
  for (int o = 16; o > 0; o >>= 1) top = fmax(top, __shfl_xor_sync(0xffffffffu, top, o));
  for (int i = lane; i < lag; i += 32) out[i] = exp(out[i] - top);
  __syncwarp();
  double total = 0.0;
  for (int i = 0; i < lag; ++i) total += out[i];  // every lane, in order
  return total;
}

// A head's entries — its slots that are not holes — in order: slots[e] = entry e's slot; their
// count returned to every thread (a block-wide scan, 256 slots at a time).
__device__ int listEntries(int n, const int* pos, int* slots) {
  using Scan = cub::BlockScan<int, kThreadsPerHead>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int entries;
  if (threadIdx.x == 0) entries = 0;
  __syncthreads();
  for (int c0 = 0; c0 < n; c0 += kThreadsPerHead) {
    const int i = c0 + threadIdx.x, entry = i < n && pos[i] != kEvicted;
    int before = 0, total = 0;
    Scan(scan).ExclusiveSum(entry, before, total);
    if (entry) slots[entries + before] = i;
    __syncthreads();
    if (threadIdx.x == 0) entries += total;
    __syncthreads();
  }
  return entries;
}

// LagKV (kv::lagScores) over a head's `entries` entries (slots[e]: entry e's slot): 1 for every
// entry, then for each partition of `lag` entries after the first `sinks` that has a successor,
// its rank among its partition by the mean of its keys' and values' state scores (ascending, ties
// to the earlier entry), over lag. Keys at slots; `sums` scratch.
__device__ void lagKeys(const EvictionCache& c, int l, int h, const int* slots, int entries, int sinks, int lag,
                        double* sums, double* keys) {
  for (int e = threadIdx.x; e < entries; e += blockDim.x) keys[slots[e]] = 1.0;
  __syncthreads();
  const int partitions = entries >= sinks + 2 * lag ? (entries - sinks) / lag - 1 : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int p = warp; p < partitions; p += kThreadsPerHead / 32) {
    const int begin = sinks + p * lag;
    // Per entry of the partition: the key's exponential, the value's, then scratch (mean, sq).
    double* k = sums + 4 * int64_t(begin);
    double* v = k + lag;
    double* scratch = v + lag;
    const double k_total = lagState(c, false, l, h, slots, begin, lag, scratch, k);
    const double v_total = lagState(c, true, l, h, slots, begin, lag, scratch, v);
    for (int i = lane; i < lag; i += 32) k[i] = (k[i] / k_total + v[i] / v_total) / 2;
    __syncwarp();
    for (int i = lane; i < lag; i += 32) {
      int rank = 0;
      for (int j = 0; j < lag; ++j) rank += k[j] < k[i] || (k[j] == k[i] && j < i);
      keys[slots[begin + i]] = double(rank) / lag;
    }
  }
  __syncthreads();
}

// CUR (kv::curScores) over a head's `entries` entries (slots[e]: entry e's slot): the squared
// norms of key and value as shares of their window of `local` entries (0: all), multiplied, as
// shares of the head's total — every sum in entry order as the CPU's. `sums` scratch, two doubles
// per entry; keys at slots.
__device__ void curKeys(const EvictionCache& c, int l, int h, const int* slots, int entries, int local, double* sums,
                        double* keys) {
  __shared__ double total;
  double* k2 = sums;
  double* v2 = sums + entries;
  for (int e = threadIdx.x; e < entries; e += blockDim.x)
    k2[e] = squaredNorm(c, false, l, h, slots[e]), v2[e] = squaredNorm(c, true, l, h, slots[e]);
  __syncthreads();
  const int w = local > 0 ? local : max(entries, 1);
  for (int b = threadIdx.x * w; b < entries; b += blockDim.x * w) {
    const int e = min(entries, b + w);
    for (int which = 0; which < 2; ++which) {
      double* x = which ? v2 : k2;
      double sum = 0.0;
      for (int i = b; i < e; ++i) sum = __dadd_rn(sum, x[i]);
      for (int i = b; i < e; ++i) x[i] = sum > 0 ? x[i] / sum : 0.0;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < entries; e += blockDim.x) k2[e] = __dmul_rn(k2[e], v2[e]);
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int e = 0; e < entries; ++e) t = __dadd_rn(t, k2[e]);
    total = t;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < entries; e += blockDim.x) keys[slots[e]] = total > 0 ? k2[e] / total : k2[e];
  __syncthreads();
}

// ChunkKV (kv::Policy::evict's chunk=): each run of `chunk` consecutive entries takes the mean of
// its keys, summed in entry order as the CPU sums them; a thread per chunk.
__device__ void chunkMeans(const int* slots, int entries, int chunk, double* keys) {
  for (int b = threadIdx.x * chunk; b < entries; b += blockDim.x * chunk) {
    const int e = min(entries, b + chunk);
    double sum = 0.0;
    for (int j = b; j < e; ++j) sum = __dadd_rn(sum, keys[slots[j]]);
    const double mean = sum / (e - b);
    for (int j = b; j < e; ++j) keys[slots[j]] = mean;
  }
  __syncthreads();
}

// SnapKV / PyramidKV (kv::Policy::evict): each entry's observed probability (w), averaged over its
// chunk of `chunk` entries from the first (kv::chunkMeans; 1: none), then the largest of the `pool`
// around it (kv::maxPool) — into keys. A prompt's head: its n slots are its entries.
__device__ void snapKeys(const float* w, int n, int chunk, int pool, double* keys) {
  auto chunked = [&](int j) {  // summed in order, as the CPU sums a chunk
    if (chunk <= 1) return double(w[j]);
    const int b = j / chunk * chunk, e = min(n, b + chunk);
    double sum = 0.0;
    for (int k = b; k < e; ++k) sum = __dadd_rn(sum, double(w[k]));
    return sum / (e - b);
  };
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int hi = min(n, i + pool / 2 + 1);
    double best = -INFINITY;
    for (int j = max(0, i - pool / 2); j < hi; j = chunk > 1 ? (j / chunk + 1) * chunk : j + 1)
      best = fmax(best, chunked(j));  // (a chunk's entries share its mean: one look a chunk)
    keys[i] = best;
  }
  __syncthreads();
}

// Scissorhands (kv::appendHistoryBits): the keys a query row of n probabilities saw — its
// average is 1 / visible — in float (exact: counts stay far below 2^24), to every thread of the block.
__device__ float visibleKeys(const float* row, int n) {
  float count = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) count += row[i] > 0.0f ? 1.0f : 0.0f;
  return blockReduce(count, warpSum, 0.0f);
}

// An entry's history after a row where it drew probability wi: where the query saw it, a bit
// appended, set if wi is above the row's average.
__device__ uint64_t appendBit(uint64_t bits, float wi, float visible) {
  return wi > 0.0f ? (bits << 1) | (wi * visible > 1.0f ? 1u : 0u) : bits;
}

// Entry i's H2O score and Scissorhands' bits after the step, where the cache keeps them (each
// follows the steps whichever key is taken): the step's probability wi added to the score, and the
// step's bit appended. A new entry starts from nothing.
__device__ void foldStep(double* score, uint64_t* history, int i, bool is_new, float wi, float visible, double& s,
                         uint64_t& bits) {
  if (score) {
    s = (is_new ? 0.0 : score[i]) + double(wi);
    score[i] = s;
  }
  if (history) {
    bits = appendBit(is_new ? 0 : history[i], wi, visible);
    history[i] = bits;
  }
}

// One block per (layer, head): Scissorhands first counts the keys this step's query saw (its
// average is 1 / visible), then every entry is scored and keyed as kv::Policy::score / evict do —
// the same float and double operations, so the same keys.
__global__ void keysKernel(EvictionCache c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                           int last_pos, double* table, ScoreInputs inputs) {
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh];
  const int64_t row = l * c.layer_stride + h * c.capacity;
  const float* w = c.weights ? c.weights + l * c.weights_layer + h * c.weights_head : nullptr;
  double* score = c.score ? c.score + row : nullptr;
  uint64_t* history = c.history ? c.history + row : nullptr;
  const int* pos = c.pos[l] + h * c.capacity;
  double* keys = table + c.table_offset[lh];
  const float visible = method == EvictScore::Scissorhands && w ? visibleKeys(w, n) : 0.0f;
  int* slots = inputs.entry_slots ? inputs.entry_slots + c.table_offset[lh] : nullptr;
  const int entries = slots ? listEntries(n, pos, slots) : 0;
  if (method == EvictScore::KeyDiff) keyDiffKeys(c, l, h, n, pos, keys);
  double* sums = inputs.row_sums ? inputs.row_sums + 4 * int64_t(c.table_offset[lh]) : nullptr;
  if (method == EvictScore::Lag) lagKeys(c, l, h, slots, entries, sinks, inputs.lag, sums, keys);
  if (method == EvictScore::CUR) curKeys(c, l, h, slots, entries, inputs.local, sums, keys);
  if (method == EvictScore::SnapKV) snapKeys(w, n, inputs.chunk, inputs.pool, keys);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const bool is_new = i >= n - fresh;
    const float wi = w ? w[i] : 0.0f;
    double s = 0.0;
    uint64_t bits = 0;
    foldStep(score, history, i, is_new, wi, visible, s, bits);
    const int p = pos[i];
    keys[i] = p == kEvicted                        ? -INFINITY
              : method == EvictScore::H2O          ? s
              : method == EvictScore::StreamingLLM ? double(p)
              : method == EvictScore::StepAttention ? double(wi)
              : method == EvictScore::KeyNorm      ? -sqrt(squaredNorm(c, false, l, h, i))
              : method == EvictScore::KeyDiff || method == EvictScore::Lag || method == EvictScore::CUR ||
                      method == EvictScore::SnapKV
                  ? keys[i]
              : method == EvictScore::QueryFilter
                  ? queryFilterKey(c, l, h, i, inputs.query_filters + int64_t(lh) * keyChannels(c))
              : method == EvictScore::Random
                  ? kernels::entryDraw(inputs.seed, l, inputs.table_heads[lh] % inputs.global_heads, p)
                  : double(__popcll(bits & history_mask));
  }
  if (inputs.chunk > 1 && method != EvictScore::SnapKV) {  // (SnapKV's chunks come before its pooling: snapKeys)
    __syncthreads();
    chunkMeans(slots, entries, inputs.chunk, keys);
  }
  // The protected last, as the CPU protects after scoring and chunking.
  const int last = inputs.last_positions ? inputs.last_positions[lh] : last_pos;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int p = pos[i];
    if (p != kEvicted && (p < sinks || p > last - recent)) keys[i] = INFINITY;
  }
}

// keysKernel for the methods whose key is the entry's own state (H2O, Scissorhands, StreamingLLM,
// the step's attention, the random draw) and no chunks: the same operations in the same order,
// without the general kernel's row-reading and per-head paths, whose registers and shared memory
// held it to a third of the bandwidth (ncu, H100: 240 us for the 6.7 M entries of a 7B model at
// 32k under a 20 % budget), and with the protection folded into the one pass (nothing rescores
// between: no chunks).
template <EvictScore M>
__global__ void __launch_bounds__(kThreadsPerHead) entryKeysKernel(EvictionCache c, int fresh, uint64_t history_mask,
                                                                    int sinks, int recent, int last_pos,
                                                                    double* table, ScoreInputs inputs) {
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh];
  const int64_t row = l * c.layer_stride + h * c.capacity;
  const float* __restrict__ w = c.weights ? c.weights + l * c.weights_layer + h * c.weights_head : nullptr;
  double* __restrict__ score = c.score ? c.score + row : nullptr;
  uint64_t* __restrict__ history = c.history ? c.history + row : nullptr;
  const int* __restrict__ pos = c.pos[l] + h * c.capacity;
  double* __restrict__ keys = table + c.table_offset[lh];
  const int last = inputs.last_positions ? inputs.last_positions[lh] : last_pos;
  const float visible = M == EvictScore::Scissorhands && w ? visibleKeys(w, n) : 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const bool is_new = i >= n - fresh;
    const float wi = w ? w[i] : 0.0f;
    const int p = pos[i];
    double s = 0.0;
    uint64_t bits = 0;
    foldStep(score, history, i, is_new, wi, visible, s, bits);
    double key;
    if constexpr (M == EvictScore::H2O) {
      key = s;
    } else if constexpr (M == EvictScore::Scissorhands) {
      key = double(__popcll(bits & history_mask));
    } else if constexpr (M == EvictScore::StreamingLLM) {
      key = double(p);
    } else if constexpr (M == EvictScore::StepAttention) {
      key = double(wi);
    } else {
      key = kernels::entryDraw(inputs.seed, l, inputs.table_heads[lh] % inputs.global_heads, p);
    }
    keys[i] = p == kEvicted ? -INFINITY : p < sinks || p > last - recent ? INFINITY : key;
  }
}

// promptHistory: one block per (layer, head); each row's visible count first (all rows, a block
// reduction each), then each thread builds its entries' bits row by row in a register.
__global__ void promptHistoryKernel(EvictionCache c, int fresh, int rows, int64_t row_stride) {
  constexpr int kMaxRows = 64;  // Scissorhands' history is at most 64 bits
  __shared__ float visible[kMaxRows];
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh];
  const float* __restrict__ w = c.weights + l * c.weights_layer + h * c.weights_head;
  uint64_t* __restrict__ history = c.history + l * c.layer_stride + h * c.capacity;
  for (int t = 0; t < rows; ++t) {
    const float count = visibleKeys(w + t * row_stride, n);
    if (threadIdx.x == 0) visible[t] = count;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    uint64_t bits = i >= n - fresh ? 0 : history[i];
    for (int t = 0; t < rows; ++t) bits = appendBit(bits, w[t * row_stride + i], visible[t]);
    history[i] = bits;
  }
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

// One block per (row, KV head): the row's value in shared memory, then per query head a thread
// per output channel j of W_o in turn.
template <class T>
__global__ void valueOutputNormsKernel(const float* qkv, int64_t stride, int64_t v_offset, int group, int hd,
                                       const T* wo, int hidden, int q_dim, float* norms) {
  extern __shared__ float v[];
  const int t = blockIdx.x, h = blockIdx.y, kv_heads = gridDim.y;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) v[d] = qkv[t * stride + v_offset + int64_t(h) * hd + d];
  __syncthreads();
  float total = 0.0f;
  for (int g = 0; g < group; ++g) {
    const int q = h * group + g;
    double sum = 0.0;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
      const T* w = wo + int64_t(j) * q_dim + int64_t(q) * hd;
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot = fmaf(toFloat(w[d]), v[d], dot);
      sum += fabs(double(dot));
    }
    sum = blockReduce(sum, warpSumD, 0.0);
    total += float(sum);  // as the CPU adds each query head's norm
  }
  if (threadIdx.x == 0) norms[int64_t(t) * kv_heads + h] = total;
}

// A block per KV head, a thread per channel: members, then rows, in the CPU's order.
__global__ void queryChannelPowerKernel(const float* qkv, int64_t stride, int rows, int window, int group, int hd,
                                        float* power) {
  const int h = blockIdx.x;
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    double sum = 0.0;
    for (int m = 0; m < group; ++m)
      for (int t = max(0, rows - window); t < rows; ++t) {
        const double q = qkv[t * stride + int64_t(h * group + m) * hd + ch];
        sum = __dadd_rn(sum, __dmul_rn(q, q));
      }
    power[h * hd + ch] = float(sum);
  }
}

// A block per (layer, head): a thread per channel sums its key power over the head's entries,
// ranks the channels by key power x query power, then the block zeroes the lowest `pruned`.
__global__ void pruneKeyChannelsKernel(EvictionCache c, const float* power, int pruned) {
  __shared__ double score[256];
  __shared__ int drop[256];
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads, n = c.length[lh], hd = keyChannels(c);
  const int* pos = c.pos[l] + h * c.capacity;
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    double sum = 0.0;
    for (int i = 0; i < n; ++i)
      if (pos[i] != kEvicted) {
        const double k = cachedKey(c, l, h, i, ch);
        sum = __dadd_rn(sum, __dmul_rn(k, k));
      }
    score[ch] = __dmul_rn(sum, double(power[int64_t(lh) * hd + ch]));
  }
  __syncthreads();
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    int rank = 0;
    for (int o = 0; o < hd; ++o) rank += score[o] < score[ch] || (score[o] == score[ch] && o < ch);
    drop[ch] = rank < pruned;
  }
  __syncthreads();
  const int element = elementBytes(c.key_format);
  char* K = static_cast<char*>(c.K[l]) + int64_t(h) * c.rowStride() * c.row_bytes;
  for (int64_t x = threadIdx.x; x < int64_t(n) * hd; x += blockDim.x) {
    const int i = int(x / hd), ch = int(x % hd);
    if (!drop[ch]) continue;
    char* at = K + int64_t(i) * c.row_bytes + ch * element;
    if (element == 4) *reinterpret_cast<float*>(at) = 0.0f;
    else *reinterpret_cast<uint16_t*>(at) = 0;  // +0 in fp16 and bf16 alike
  }
}

// Grid (layer x head, chunks): each block strides its head's (slot, channel) pairs.
__global__ void cachedRowsKernel(EvictionCache c, int hd, float* keys, float* values) {
  const int lh = blockIdx.x, l = lh / c.heads, h = lh % c.heads;
  const int64_t n = int64_t(c.length[lh]) * hd, first = int64_t(c.table_offset[lh]) * hd;
  for (int64_t x = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; x < n; x += int64_t(gridDim.y) * blockDim.x) {
    const int i = int(x / hd), d = int(x % hd);
    keys[first + x] = cachedChannel(c, false, l, h, i, d);
    values[first + x] = cachedChannel(c, true, l, h, i, d);
  }
}

__global__ void evictBelowKernel(const double* table, int64_t n, double threshold, uint8_t* keep) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n && table[i] < threshold) keep[i] = 0;
}

}  // namespace

void evictionKeys(const EvictionCache& c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                  int last_pos, double* table, const ScoreInputs& inputs) {
  const int blocks = c.layers * c.heads;
  auto entryKeys = [&](auto m) {
    entryKeysKernel<decltype(m)::value><<<blocks, kThreadsPerHead>>>(c, fresh, history_mask, sinks, recent, last_pos,
                                                                     table, inputs);
  };
  using S = EvictScore;
  if (inputs.chunk > 1) keysKernel<<<blocks, kThreadsPerHead>>>(c, method, fresh, history_mask, sinks, recent, last_pos,
                                                                table, inputs);
  else if (method == S::H2O) entryKeys(std::integral_constant<S, S::H2O>{});
  else if (method == S::Scissorhands) entryKeys(std::integral_constant<S, S::Scissorhands>{});
  else if (method == S::StreamingLLM) entryKeys(std::integral_constant<S, S::StreamingLLM>{});
  else if (method == S::StepAttention) entryKeys(std::integral_constant<S, S::StepAttention>{});
  else if (method == S::Random) entryKeys(std::integral_constant<S, S::Random>{});
  else keysKernel<<<blocks, kThreadsPerHead>>>(c, method, fresh, history_mask, sinks, recent, last_pos, table, inputs);
  KVTP_CUDA_LAUNCHED();
}

void promptHistory(const EvictionCache& c, int fresh, int rows, int64_t row_stride) {
  if (rows < 1 || rows > 64) throw std::invalid_argument("promptHistory: " + std::to_string(rows) + " rows (1 to 64)");
  promptHistoryKernel<<<c.layers * c.heads, kThreadsPerHead>>>(c, fresh, rows, row_stride);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void valueOutputNorms(const float* qkv, int64_t stride, int64_t v_offset, int rows, int kv_heads, int group,
                      int head_dim, const T* wo, int hidden, int q_dim, float* norms) {
  if (rows == 0) return;
  valueOutputNormsKernel<T><<<dim3(rows, kv_heads), 256, head_dim * sizeof(float)>>>(qkv, stride, v_offset, group,
                                                                                    head_dim, wo, hidden, q_dim, norms);
  KVTP_CUDA_LAUNCHED();
}
template void valueOutputNorms<float>(const float*, int64_t, int64_t, int, int, int, int, const float*, int, int,
                                      float*);
template void valueOutputNorms<__half>(const float*, int64_t, int64_t, int, int, int, int, const __half*, int, int,
                                       float*);
template void valueOutputNorms<__nv_bfloat16>(const float*, int64_t, int64_t, int, int, int, int, const __nv_bfloat16*,
                                              int, int, float*);

void queryChannelPower(const float* qkv, int64_t stride, int rows, int window, int kv_heads, int group, int head_dim,
                       float* power) {
  if (kv_heads == 0) return;
  queryChannelPowerKernel<<<kv_heads, 128>>>(qkv, stride, rows, window, group, head_dim, power);
  KVTP_CUDA_LAUNCHED();
}

void pruneKeyChannels(const EvictionCache& c, const float* power, int pruned) {
  if (c.key_format != KeyFormat::F32 && c.key_format != KeyFormat::F16 && c.key_format != KeyFormat::BF16)
    throw std::runtime_error("pruneKeyChannels: full-precision keys only (ThinK takes no quantization)");
  pruneKeyChannelsKernel<<<c.layers * c.heads, 256>>>(c, power, pruned);
  KVTP_CUDA_LAUNCHED();
}

void cachedRows(const EvictionCache& c, int head_dim, float* keys, float* values) {
  if (c.layers * c.heads == 0) return;
  cachedRowsKernel<<<dim3(c.layers * c.heads, 64), 256>>>(c, head_dim, keys, values);
  KVTP_CUDA_LAUNCHED();
}

void evictBelow(const double* table, int64_t n, double threshold, uint8_t* keep) {
  if (n == 0) return;
  evictBelowKernel<<<unsigned((n + 255) / 256), 256>>>(table, n, threshold, keep);
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
