// KIVI and low rank under eviction on the device (eviction.h): the compaction that thins KIVI's
// runs as kv::KVCache::retain does (low rank's coordinates move as codes without runs), and the
// ring's resizing around a prompt.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <stdexcept>

#include "kernels/cuda/cuda_util.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/eviction.h"

namespace kvtp::cuda {
namespace {

constexpr int kWarps = kThreads / 32;  // kThreads: device_util.cuh

struct Maximum {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// n bytes from src to dst by the lanes of a warp: 4-byte words where both allow it.
__device__ void warpCopy(void* dst, const void* src, int n, int lane) {
  if (n % 4 == 0 && (reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 4 == 0) {
    for (int w = lane; w < n / 4; w += 32) static_cast<uint32_t*>(dst)[w] = static_cast<const uint32_t*>(src)[w];
  } else {
    for (int b = lane; b < n; b += 32) static_cast<uint8_t*>(dst)[b] = static_cast<const uint8_t*>(src)[b];
  }
}

// One block per (layer, head). A scan over every slot, 256 at a time, gives each kept row its new
// slot and each kept coded row its run's new index (runs ascend with the slots, so a row opens a
// run when its run is above every earlier kept row's). Rows move down in sub-chunks of one row a
// warp, staged in shared memory: every read of a sub-chunk finishes before any write, and no row
// lands where a later sub-chunk's row still is (rows move down, in order). Compacting all, the
// ring's rows go through a scratch (their ring rows change by more than the ring's length allows
// in place), and the key pairs move down to their runs' new indices, a 4-byte word a thread.
//
// Most steps evict a few coded rows and compact nothing: then one pass marks the holes and counts
// what stays (the runs with a kept row as bits of a shared bitmap, `run_words` words: runs ascend
// with the slots but need not be dense), and the scans walk the ring's rows only, not four block
// scans per 256 slots of every head.
__global__ void __launch_bounds__(kThreads) kiviCompactKernel(EvictionCache c, KiviEviction k, const uint8_t* keep,
                                                               bool compact_all, int stage_bytes, int run_words,
                                                               int* out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int dest[kThreads], new_run[kThreads];
  __shared__ int carry_kept, carry_ring, carry_runs, carry_max_run;
  extern __shared__ __align__(16) uint8_t stage[];
  const int lh = blockIdx.x, LH = c.layers * c.heads, l = lh / c.heads, h = lh % c.heads;
  const int n = c.length[lh], coded = k.coded[lh], lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cb = k.code_bytes, vg = k.value_groups, rb = k.ring_row_bytes, R = k.ring_rows, hd = k.head_dim,
            pb = k.pair_bytes;
  const int64_t base = h * c.capacity, stat = l * c.layer_stride + base, code_base = h * c.rowStride();
  uint8_t* K = static_cast<uint8_t*>(c.K[l]) + code_base * cb;
  uint8_t* V = c.V[l] ? static_cast<uint8_t*>(c.V[l]) + code_base * cb : nullptr;  // low rank: none (K holds both)
  // a row's value pairs: vg x pb bytes
  uint8_t* vp = k.v_params ? static_cast<uint8_t*>(k.v_params[l]) + code_base * vg * pb : nullptr;
  int* run = k.run ? k.run[l] + code_base : nullptr;
  int* pos = c.pos[l] + base;
  double* score = c.score ? c.score + stat : nullptr;
  uint64_t* history = c.history ? c.history + stat : nullptr;
  uint8_t* ring_k = static_cast<uint8_t*>(k.ring_k[l]) + int64_t(h) * R * rb;
  uint8_t* ring_v = static_cast<uint8_t*>(k.ring_v[l]) + int64_t(h) * R * rb;
  uint8_t* scratch = static_cast<uint8_t*>(k.ring_scratch) + int64_t(lh) * R * 2 * rb;
  int* run_map = k.run_map + int64_t(lh) * k.key_groups;
  const uint8_t* flags = keep + c.table_offset[lh];

  unsigned* alive = reinterpret_cast<unsigned*>(stage + kWarps * stage_bytes);  // [run_words]
  for (int w = threadIdx.x; w < run_words; w += blockDim.x) alive[w] = 0;
  __syncthreads();
  float coded_kept = 0.0f, ring_kept = 0.0f;  // exact in float below 2^24
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (!flags[i]) {
      if (i < coded && pos[i] != kEvicted) pos[i] = kEvicted;  // a hole (moot if all rows move)
    } else if (i >= coded) {
      ring_kept += 1.0f;
    } else {
      coded_kept += 1.0f;
      if (run_words) atomicOr(&alive[run[i] / 32], 1u << (run[i] % 32));
    }
  }
  const int kc = int(blockReduce(coded_kept, warpSum, 0.0f)), kr = int(blockReduce(ring_kept, warpSum, 0.0f));
  float alive_runs = 0.0f;  // blockReduce's barriers publish the bitmap
  for (int w = threadIdx.x; w < run_words; w += blockDim.x) alive_runs += float(__popc(alive[w]));
  const int runs_alive = int(blockReduce(alive_runs, warpSum, 0.0f));
  // Without coded rows compacting the ring's rows in place is compacting all. Coded rows stay
  // where they are unless all move: then the scans start at the ring (the bitmap counted the runs).
  const bool all = coded > 0 && (compact_all || 8 * (coded - kc) > coded + kr);
  const int first = all || (run && !run_words) ? 0 : coded;
  if (threadIdx.x == 0) carry_kept = 0, carry_ring = 0, carry_runs = 0, carry_max_run = -1;
  __syncthreads();
  for (int c0 = first; c0 < n; c0 += kThreads) {
    const int i = c0 + threadIdx.x;
    const bool in = i < n, kept = in && flags[i], is_coded = i < coded;
    const int r = kept && is_coded && run ? run[i] : -1, max_before_chunk = carry_max_run;
    int max_before = 0, max_in_chunk = 0;
    Scan(scan).ExclusiveScan(r, max_before, max_before_chunk, Maximum(), max_in_chunk);
    __syncthreads();
    const int opens = r >= 0 && r > max_before;
    int runs_before = 0, runs_in_chunk = 0;
    Scan(scan).ExclusiveSum(opens, runs_before, runs_in_chunk);
    __syncthreads();
    if (all && opens) run_map[carry_runs + runs_before] = r;
    int kept_before = 0, kept_in_chunk = 0, ring_before = 0, ring_in_chunk = 0;
    Scan(scan).ExclusiveSum(int(kept), kept_before, kept_in_chunk);
    __syncthreads();
    Scan(scan).ExclusiveSum(int(kept && !is_coded), ring_before, ring_in_chunk);
    const int to = !kept ? -1 : all ? carry_kept + kept_before : is_coded ? i : coded + carry_ring + ring_before;
    dest[threadIdx.x] = to;
    new_run[threadIdx.x] = carry_runs + runs_before + opens - 1;
    if (all && kept && is_coded && to == i && run) run[i] = new_run[threadIdx.x];
    __syncthreads();
    if (all)  // the chunk's kept ring rows to the scratch, by rank (nothing writes the ring before the end)
      for (int j = warp; j < kThreads && c0 + j < n; j += kWarps) {
        const int row = c0 + j;
        if (row < coded || dest[j] < 0) continue;
        const int rank = dest[j] - kc;
        warpCopy(scratch + int64_t(2 * rank) * rb, ring_k + int64_t(row % R) * rb, rb, lane);
        warpCopy(scratch + int64_t(2 * rank + 1) * rb, ring_v + int64_t(row % R) * rb, rb, lane);
      }
    if (__syncthreads_or(kept && to != i)) {
      uint8_t* st = stage + warp * stage_bytes;
      for (int s0 = 0; s0 < kThreads && c0 + s0 < n; s0 += kWarps) {
        const int j = s0 + warp, row = c0 + j, t = row < n ? dest[j] : -1;
        const bool mine = t >= 0 && t != row, ring_row = row >= coded;
        int p = 0;
        double sc = 0.0;
        uint64_t hi = 0;
        if (mine) {
          if (!ring_row) {
            warpCopy(st, K + int64_t(row) * cb, cb, lane);
            if (V) warpCopy(st + cb, V + int64_t(row) * cb, cb, lane);
            if (vp) warpCopy(st + 2 * cb, vp + int64_t(row) * vg * pb, vg * pb, lane);
          } else if (!all) {
            warpCopy(st, ring_k + int64_t(row % R) * rb, rb, lane);
            warpCopy(st + rb, ring_v + int64_t(row % R) * rb, rb, lane);
          }
          p = pos[row];
          if (score) sc = score[row];
          if (history) hi = history[row];
        }
        __syncthreads();
        if (mine) {
          if (!ring_row) {
            warpCopy(K + int64_t(t) * cb, st, cb, lane);
            if (V) warpCopy(V + int64_t(t) * cb, st + cb, cb, lane);
            if (vp) warpCopy(vp + int64_t(t) * vg * pb, st + 2 * cb, vg * pb, lane);
            if (lane == 0 && run) run[t] = new_run[j];
          } else if (!all) {
            warpCopy(ring_k + int64_t(t % R) * rb, st, rb, lane);
            warpCopy(ring_v + int64_t(t % R) * rb, st + rb, rb, lane);
          }
          if (lane == 0) {
            pos[t] = p;
            if (score) score[t] = sc;
            if (history) history[t] = hi;
          }
        }
        __syncthreads();
      }
    }
    if (threadIdx.x == 0) {
      carry_kept += kept_in_chunk, carry_ring += ring_in_chunk, carry_runs += runs_in_chunk;
      carry_max_run = max(carry_max_run, max_in_chunk);
    }
    __syncthreads();
  }
  if (all) {
    for (int j = warp; j < kr; j += kWarps) {
      warpCopy(ring_k + int64_t((kc + j) % R) * rb, scratch + int64_t(2 * j) * rb, rb, lane);
      warpCopy(ring_v + int64_t((kc + j) % R) * rb, scratch + int64_t(2 * j + 1) * rb, rb, lane);
    }
    // Run j takes run_map[j]'s pairs: map[j] >= j and ascends, so no pair is overwritten before it is read.
    // (A run's pairs are hd x pb bytes, moved as 4-byte words: pb is 4 or 8.)
    uint32_t* kp = k.k_params ? static_cast<uint32_t*>(k.k_params[l]) + int64_t(h) * k.key_groups * hd * pb / 4 : nullptr;
    const int words = hd * pb / 4;
    for (int w = threadIdx.x; w < words && kp; w += blockDim.x)
      for (int j = 0; j < carry_runs; ++j) {
        const int from = run_map[j];
        if (from != j) kp[int64_t(j) * words + w] = kp[int64_t(from) * words + w];
      }
  }
  if (threadIdx.x == 0) {
    out[lh] = (all ? kc : coded) + kr;
    out[LH + lh] = kc + kr;
    out[2 * LH + lh] = all ? kc : coded;
    out[3 * LH + lh] = first == 0 ? carry_runs : runs_alive;
    out[4 * LH + lh] = all;
  }
}

// One block per (head, a share of its rows): row l from l % from_rows to l % to_rows.
__global__ void ringResizeKernel(const uint8_t* from_k, const uint8_t* from_v, int from_rows, uint8_t* to_k,
                                 uint8_t* to_v, int to_rows, int row_bytes, const int* coded, const int* length) {
  const int h = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int l = coded[h] + blockIdx.y * warps + warp; l < length[h]; l += gridDim.y * warps) {
    const int64_t from = (int64_t(h) * from_rows + l % from_rows) * row_bytes, to = (int64_t(h) * to_rows + l % to_rows) * row_bytes;
    warpCopy(to_k + to, from_k + from, row_bytes, lane);
    warpCopy(to_v + to, from_v + from, row_bytes, lane);
  }
}

}  // namespace

void kiviEvictionCompact(const EvictionCache& c, const KiviEviction& k, const uint8_t* keep, bool compact_all,
                         int* out) {
  // A warp's staged row: a coded row (codes and value pairs) or a ring row (key and value).
  const int row = std::max(2 * k.code_bytes + k.pair_bytes * k.value_groups, 2 * k.ring_row_bytes);
  const int stage_bytes = (row + 15) / 16 * 16;
  if (kWarps * stage_bytes > 48 * 1024) throw std::runtime_error("kiviEvictionCompact: rows above 6 KiB");
  // The runs' bitmap where it fits beside the stage (else the scans count the runs over every slot).
  int run_words = k.run ? int((k.key_groups + 31) / 32) : 0;
  if (kWarps * stage_bytes + 4 * int64_t(run_words) > 48 * 1024) run_words = 0;
  kiviCompactKernel<<<c.layers * c.heads, kThreads, kWarps * stage_bytes + 4 * run_words>>>(
      c, k, keep, compact_all, stage_bytes, run_words, out);
  KVTP_CUDA_LAUNCHED();
}

void ringResize(const void* from_k, const void* from_v, int from_rows, void* to_k, void* to_v, int to_rows, int heads,
                int row_bytes, const int* coded, const int* length) {
  if (heads == 0) return;
  ringResizeKernel<<<dim3(heads, 16), 256>>>(static_cast<const uint8_t*>(from_k), static_cast<const uint8_t*>(from_v),
                                              from_rows, static_cast<uint8_t*>(to_k), static_cast<uint8_t*>(to_v),
                                              to_rows, row_bytes, coded, length);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
