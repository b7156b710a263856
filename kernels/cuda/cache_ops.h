// The device KV cache in its compressed forms (the CUDA engine's store, runtime/gpu_store.cuh):
// int8 rows, KIVI's codes, runs and ring, low rank's coordinates and ring, and the compaction
// eviction leaves to do. Layout [kv_head][capacity] per layer, as the full-precision cache of
// forward_ops.h; the CPU's forms are kv::KVCache's (kv/kv_cache.h), the same arithmetic.
#pragma once
#include <cstdint>

#include "kernels/cuda/cuda_util.h"

namespace kvtp::cuda {

// An int8 cache (kv::KVCache's Int8 form) on the device, [kv_head][capacity] rows of head_dim
// codes with a float step each for keys and values, and where this step's rows are: the float
// projection qkv (rows of qkv_stride; keys at k_offset, values at v_offset, after RoPE), to land
// at each KV head's slots first_slots[g] + t with `positions` (a batch: as KvAppend).
struct Int8Append {
  int head_dim;
  int8_t *K, *V;
  float *k_step, *v_step;
  int* k_pos;
  int64_t capacity;
  const float* qkv;
  int64_t qkv_stride, k_offset, v_offset;
  const int* first_slots;
  const int* positions;
  bool rows_are_sequences = false;
};
// The new rows quantized into the cache, with their positions.
void quantizeAppend(int rows, int kv_heads, const Int8Append& cache);
// Rows [0, count) of every head back to T, with positions, into a stage laid out as a T cache of
// stage_capacity rows per head (what the prefill attention reads).
template <class T>
void dequantizeRows(const Int8Append& cache, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity);

// The newest rows of each KV head kept at full precision (KIVI's residual window, low rank's
// window): row l of head h at slot l % rows, [kv_head][rows][head_dim], keys and values.
template <class T>
struct Ring {
  T *k = nullptr, *v = nullptr;
  int rows = 0, head_dim = 0;
  __host__ __device__ int64_t at(int64_t head, int64_t l) const { return (head * rows + l % rows) * head_dim; }
#ifdef __CUDACC__
  // Row l of head h from key and value rows elsewhere, a channel per thread of the block.
  __device__ void put(int64_t head, int64_t l, const T* key, const T* value) const {
    const int64_t to = at(head, l);
    for (int ch = threadIdx.x; ch < head_dim; ch += blockDim.x) k[to + ch] = key[ch], v[to + ch] = value[ch];
  }
#endif
};

// KIVI's (lo, step) of a channel (keys) or channel group (values), held in the cache's type T as
// KIVI's own code holds them in the model's dtype: an fp16 cache's pair is the 4 bytes
// kv::StoreShape counts. Fitted in float, rounded to T, and the codes encoded against the rounded
// pair (kiviSettle), so decoding uses what was encoded with; an fp32 cache's pair is the CPU's.
template <class T>
struct alignas(2 * sizeof(T)) AffinePair {
  T lo, step;
  __host__ __device__ static AffinePair rounded(float lo, float step) { return {fromFloat<T>(lo), fromFloat<T>(step)}; }
  __host__ __device__ float2 get() const { return {toFloat(lo), toFloat(step)}; }
};

// A KIVI cache (kv::KVCache's Kivi form) on the device. Each KV head's oldest rows are codes of
// `bits` bits packed as the CPU packs them (low bits first): keys per channel over runs of `group`
// rows — (lo, step) per channel per run in k_params — and values per row over groups of `group`
// channels — (lo, step) per channel group in v_params; x = lo + code * step. The newer rows (at most
// ring.rows) stay full precision in the ring. Positions of every row in k_pos, pos_capacity a head
// (under eviction a head's slots outnumber its coded rows: the codes' arrays hold `capacity`). Pointers at the
// step's first KV head, as K/V; `quantized` / `quantized_after` (device, per KV head from there):
// rows held as codes before the step and after it (the step quantizes the runs in between:
// kiviSettle). Without eviction row l belongs to run l / group; under eviction (which thins runs
// and moves rows down, kiviEvictionCompact) each coded row carries its run in `run`, and a head's
// next run is `runs[h]`.
template <class T>
struct KiviCache {
  int head_dim, bits, group;
  uint8_t *K, *V;       // [kv_head][capacity][codeBytes()]
  AffinePair<T>* k_params;  // [kv_head][key_groups][head_dim]
  AffinePair<T>* v_params;  // [kv_head][capacity][valueGroups()]
  Ring<T> ring;
  int* k_pos;           // [kv_head][pos_capacity]
  int64_t capacity, pos_capacity;  // coded rows, slots a head
  const int *quantized, *quantized_after;
  int64_t key_groups = 0;   // runs' key pairs per KV head
  int* run = nullptr;       // under eviction: [kv_head][capacity], each coded row's run
  const int* runs = nullptr;  // under eviction: per KV head, the run the next quantized one takes
  __host__ __device__ int codeBytes() const { return (head_dim * bits + 7) / 8; }
  __host__ __device__ int valueGroups() const { return (head_dim + group - 1) / group; }
  __host__ __device__ int64_t keyGroups() const { return key_groups; }
  __host__ __device__ int runOf(int64_t head, int l) const { return run ? run[head * capacity + l] : l / group; }
  // Code c of a packed row; row l's key / value (lo, step) for channel c; a decoded value as
  // kv::Affine::decode computes it (no fused multiply-add).
  __host__ __device__ int code(const uint8_t* row, int c) const {
    return (row[c * bits / 8] >> (c * bits % 8)) & ((1 << bits) - 1);
  }
  __host__ __device__ float2 keyParams(int64_t head, int l, int c) const {
    return k_params[(head * keyGroups() + runOf(head, l)) * head_dim + c].get();
  }
  __host__ __device__ float2 valueParams(int64_t head, int l, int c) const {
    return v_params[(head * capacity + l) * valueGroups() + c / group].get();
  }
#ifdef __CUDACC__
  static __device__ float decode(float2 a, int code) { return __fadd_rn(a.x, __fmul_rn(float(code), a.y)); }
#endif
};
// The step's new rows (after RoPE, in qkv as Int8Append reads them) into the ring, with positions.
template <class T>
void kiviAppend(const KiviCache<T>& cache, int rows, int kv_heads, const float* qkv, int64_t qkv_stride,
                int64_t k_offset, int64_t v_offset, const int* first_slots, const int* positions,
                bool rows_are_sequences);
// Quantizes each KV head's rows [quantized, quantized_after) (at most `max_runs` runs of `group`)
// from the ring, or with a stage (a T cache of stage_capacity rows per head, stage_pos its
// positions) from the stage, whose rows [quantized_after, lengths) then go to the ring and whose
// positions from `first_new` on go to k_pos. kv::KVCache::quantizeKivi's arithmetic exactly.
template <class T>
void kiviSettle(const KiviCache<T>& cache, int kv_heads, int max_runs, const T* stage_k = nullptr,
                const T* stage_v = nullptr, const int* stage_pos = nullptr, int64_t stage_capacity = 0,
                const int* lengths = nullptr, int first_new = 0);
// kiviSettle's quantization (from the ring) for `count` caches at once — each layer's, a device
// array — in one launch.
template <class T>
void kiviSettleLayers(const KiviCache<T>* layers, int count, int kv_heads, int max_runs, int head_dim);
// Rows [0, count) of every KV head back to T (codes dequantized, ring rows copied), with
// positions, into a stage as dequantizeRows.
template <class T>
void kiviRows(const KiviCache<T>& cache, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity);

// A low-rank cache (kv::KVCache's LowRank form, CSKV) on the device. Each KV head's oldest rows,
// all but the newest `window`, are their coordinates in the head's bases: `rank` key coordinates
// (of the key taken out of RoPE's rotation: W_k acts before it) then `rank` value coordinates, as
// the CPU stores them. The newer rows stay in the ring: full precision, or with `int8` (--kv-quant
// int8) as int8 codes and their float step (kv::fitInt8 / encodeInt8) in the first head_dim + 4
// bytes of a ring row — a row is held as codes from its step on, and projected from them.
// Attention reads full rows from a stage the step fills (lowRankRows); `projected` /
// `projected_after` (device, per KV head from the step's first): rows held as coordinates before
// the step and after it.
template <class T>
struct LowRankCache {
  int head_dim, rank;
  int kv_heads;                          // the layer's bases: cache head h uses basis h % kv_heads
  T* coords;                             // [kv_head][capacity][2 rank]
  const T *key_basis, *value_basis;      // [kv_heads][head_dim][rank] (kv::LowRankBases' layout)
  const float* inv_freq;                 // RoPE's (null: none, OPT)
  Ring<T> ring;
  const int* k_pos;                      // [kv_head][capacity]
  int64_t capacity;
  const int *projected, *projected_after;
  bool int8 = false;
};
// Rows [0, counts[h]) of each of `heads` KV heads into a stage laid out as the cache (capacity rows
// per head): coordinates reconstructed (B z, then keys rotated to their positions), the ring's
// rows copied. Reconstructs `rows` rows per head (a bound on counts[h]: the launch stays the same
// while the counts change, for CUDA graphs) with cuBLAS, tensor cores for fp16/bf16.
template <class T>
void lowRankRows(const Blas& blas, const LowRankCache<T>& cache, int heads, int rows, const int* counts, T* K, T* V);
// After the step's attention over the stage: rows [projected, projected_after) of each head become
// coordinates (kv::KVCache::toLowRank's arithmetic, accumulated in double as there; with int8 a
// new row, l >= first_new[h], through its codes first, as kv::Policy quantizes before it
// projects), rows [max(projected_after, first_new[h]), lengths[h]) go to the ring. `max_rows`: a bound on the rows
// a head projects (more are projected in turns). K and V null: the rows projected are read from
// the ring, and none goes to it (first_new = lengths).
template <class T>
void lowRankSettle(const LowRankCache<T>& cache, int heads, int max_rows, const T* K, const T* V,
                   const int* first_new, const int* lengths);

// Eviction on the device: KV head h keeps its rows keep[h * max_kept + j] for j < kept[h] (ascending
// slots), moved with their positions (unless k_pos is null) to slots 0.. kept[h] - 1. keep and
// kept are device arrays. Rows of head_dim elements: an int8 cache's codes, or (head_dim 1) its steps.
template <class T>
void compactKV(T* K, T* V, int* k_pos, int64_t capacity, int kv_heads, int head_dim, const int* keep, const int* kept,
               int max_kept);

// A cache whose entries' forms the host holds (tiered precision, low rank with KIVI: the CUDA
// engine's host_forms_): the device keeps every entry's values at full precision in T. Rows
// [first_slots[h], + rows) of each of `heads` heads (capacity rows a head) into out_k / out_v as
// float, (heads, rows, head_dim); and n float rows (n x head_dim) written back at cache rows at[i]
// (head x capacity + slot), rounded to T.
template <class T>
void readNewRows(const T* K, const T* V, int64_t capacity, int heads, int head_dim, const int* first_slots, int rows,
                 float* out_k, float* out_v);
template <class T>
void writeRows(T* K, T* V, int head_dim, const int64_t* at, int n, const float* k, const float* v);

#ifdef __CUDACC__
// The cache row (head * capacity + slot) where new row t's KV head g lands (KvAppend, Int8Append).
template <class A>
__device__ inline int64_t newRow(const A& a, int t, int g, int kv_heads) {
  if (a.rows_are_sequences) {
    const int head = t * kv_heads + g;
    return head * a.capacity + a.first_slots[head];
  }
  return g * a.capacity + a.first_slots[g] + t;
}
#endif

}  // namespace kvtp::cuda
