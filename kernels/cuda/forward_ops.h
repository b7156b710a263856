// The kernels of the GPU forward pass (runtime/gpu_engine.cu) beyond the float twins of
// cuda_ops.h: mixed precision (T = float, __half or __nv_bfloat16 storage; float math and
// accumulation), row strides for the fused QKV projection, and the device KV cache's layout
// [kv_head][capacity][head_dim]. Their CPU counterparts are the float kernels of cpu_ops.h; the
// engine as a whole is compared with the CPU model (tests/cuda_engine_test.cpp).
#pragma once
#include <cstdint>

#include "kernels/cuda/cuda_util.h"

namespace kvtp::cuda {

// RMSNorm folded into the decode products around it, so that no norm kernel runs between them:
// the product adding into the residual row x (gemm, accumulate) also writes fed = T(x ∘ w) and,
// per block of its GEMV, the sum of the new x² (sums); the next product (qkvAppend,
// gemmActivation) reads fed as its input and scales each dot by rsqrt(mean x² + eps) before bias
// and activation: W (x ∘ w) rsqrt(mean x² + eps) is W rmsnorm(x). One row through the GEMV
// kernels only (deferredNormFits; the products throw otherwise). fed holds x ∘ w unnormalized: in fp16
// that is exact in relative terms but must stay below 65504, as a model run in fp16 needs anyway.
template <class T>
struct DeferredNorm {
  const float* w = nullptr;  // the norm's weights (the emitting product)
  T* fed = nullptr;
  float* sums = nullptr;     // deferredNormSums(dim) of them
  float eps = 0.0f;
};
// How many partial sums a row of `dim` leaves.
int deferredNormSums(int dim);
// Whether a layer's four products (Q|K|V of head_dim heads over hidden, O over q_dim, gate|up over
// hidden, down over ffn) all take the GEMV kernels for `rows` rows, as a DeferredNorm needs.
template <class T>
bool deferredNormFits(int rows, int hidden, int q_dim, int ffn, int head_dim);

// y (rows, out) float = x (rows, in) · W^T (+ bias, float) (+ y if accumulate); x and W of type T,
// W (out, in) row-major; float32 accumulation (strict for T = float: no TF32). One row (decode)
// goes through a bandwidth-bound GEMV kernel, more through cuBLAS. `emit`: see DeferredNorm.
template <class T>
void gemm(const Blas& blas, const T* x, int rows, int in, const T* W, int out, const float* bias, float* y,
          bool accumulate, const DeferredNorm<T>* emit = nullptr);
// The same product always through cuBLAS (benchmarks compare the two paths).
template <class T>
void gemmBlas(const Blas& blas, const T* x, int rows, int in, const T* W, int out, const float* bias, float* y,
              bool accumulate);

// The MLP's first product and activation: out (rows, F) = silu(x Wg^T + bg) * (x Wu^T + bu) for
// W = [Wg; Wu] (2F, in) (Llama), or relu(x W^T + b) for W (F, in) (OPT). One row: a GEMV with the
// activation in its epilogue; more: cuBLAS into `scratch` (rows x 2F or rows x F floats), then
// the activation.
enum class Activation { SiluMul, Relu };
// `normed`: x is a DeferredNorm's fed row, scaled here.
template <class T>
void gemmActivation(const Blas& blas, const T* x, int rows, int in, const T* W, int F, const float* bias,
                    Activation act, float* scratch, T* out, const DeferredNorm<T>* normed = nullptr);

// RoPE's rotations of a step's rows, computed once for all layers: rope (rows, head_dim / 2) =
// (cos, sin) of positions[t] * inv_freq[j], the angle in double as on the CPU.
void ropeTable(const int* positions, int rows, int head_dim, const float* inv_freq, float2* rope);

// What follows the fused Q|K|V product (rows of q_heads + 2 kv_heads heads): RoPE (rotate_half by
// the ropeTable; skipped when rope is null) on the Q and K heads in place,
// then K and V appended to the cache at slots first_slots[h].. of each KV head h (device array:
// heads hold different counts once compressed): cache[(h * capacity + slot) * head_dim + d], and
// the rows' positions to k_pos[h * capacity + slot]. K and V null: RoPE only (an int8 cache
// appends the rotated rows from qkv with quantizeAppend).
// A batch (rows_are_sequences): row t is the one new token of sequence t, whose KV heads follow
// the earlier sequences' (cache heads t * kv_heads + h, first_slots indexed alike), at slot
// first_slots[t * kv_heads + h].
template <class T>
struct KvAppend {
  int q_heads, kv_heads, head_dim;
  const int* positions;  // of the new rows (device)
  const float2* rope;    // ropeTable of the new rows
  T *K, *V;
  int* k_pos;
  int64_t capacity;
  const int* first_slots;
  bool rows_are_sequences = false;
};
template <class T>
void ropeAppendKV(float* qkv, int rows, const KvAppend<T>& kv);
// qkv (rows, (q_heads + 2 kv_heads) head_dim) = x · W^T + bias, then ropeAppendKV. One row: a
// single GEMV kernel whose epilogue rotates and appends (head_dim a multiple of 16). `normed`: as
// gemmActivation's.
template <class T>
void qkvAppend(const Blas& blas, const T* x, int rows, int in, const T* W, const float* bias, float* qkv,
               const KvAppend<T>& kv, const DeferredNorm<T>* normed = nullptr);

// out[i] = T(in[i]).
template <class T>
void convert(const float* in, int64_t n, T* out);

// out (rows, dim) = the embedding rows of tokens inside [vocab_begin, vocab_end), zeros for the
// others (a vocab-parallel shard; the all-reduce assembles whole rows).
template <class T>
void embed(const int* tokens, int rows, const T* table, int vocab_begin, int vocab_end, int dim, float* out);
// x (rows, dim) += table[positions[t] + offset] (OPT's learned positions).
void addPositions(float* x, int rows, int dim, const float* table, const int* positions, int offset);

// Norms of float rows into T (or float, in place allowed); b null for RMSNorm.
template <class O>
void layerNormTo(const float* x, int rows, int dim, const float* w, const float* b, float eps, O* y);
template <class O>
void rmsNormTo(const float* x, int rows, int dim, const float* w, float eps, O* y);

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

// A KIVI cache (kv::KVCache's Kivi form) on the device. Each KV head's oldest rows are codes of
// `bits` bits packed as the CPU packs them (low bits first): keys per channel over runs of `group`
// rows — (lo, step) per channel per run in k_params — and values per row over groups of `group`
// channels — (lo, step) per channel group in v_params; x = lo + code * step. The newer rows (at most
// ring.rows) stay full precision in the ring. Positions of every row in k_pos. Pointers at the
// step's first KV head, as K/V; `quantized` / `quantized_after` (device, per KV head from there):
// rows held as codes before the step and after it (the step quantizes the runs in between:
// kiviSettle). Without eviction row l belongs to run l / group; under eviction (which thins runs
// and moves rows down, kiviEvictionCompact) each coded row carries its run in `run`, and a head's
// next run is `runs[h]`.
template <class T>
struct KiviCache {
  int head_dim, bits, group;
  uint8_t *K, *V;       // [kv_head][capacity][codeBytes()]
  float* k_params;      // [kv_head][key_groups][head_dim] x (lo, step)
  float* v_params;      // [kv_head][capacity][valueGroups()] x (lo, step)
  Ring<T> ring;
  int* k_pos;           // [kv_head][capacity]
  int64_t capacity;
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
    return reinterpret_cast<const float2*>(k_params)[(head * keyGroups() + runOf(head, l)) * head_dim + c];
  }
  __host__ __device__ float2 valueParams(int64_t head, int l, int c) const {
    return reinterpret_cast<const float2*>(v_params)[(head * capacity + l) * valueGroups() + c / group];
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

// Causal attention of many queries. q: columns [0, heads * head_dim) of rows of stride q_stride,
// float; K/V as ropeAppendKV, every head holding the same L positions k_pos (ascending); out
// (rows, heads * head_dim) of type T. fp16/bf16 at head_dim 64 or 128 (flashAttentionFits): the
// tensor-core kernel below. Otherwise, and for the rows whose probabilities are wanted, through
// cuBLAS: scores S = Q K^T per KV head (its G query heads stacked), a masked softmax by position,
// O = P V, queries in chunks so that the scores never need more than `score_bytes`. With
// `observed` float: per KV head and key, the attention probabilities of query rows
// observe_from.. summed over the KV head's query heads — (kv_heads, L), the rows added up
// (SnapKV's observation window, H2O's scores), or with observe_rows (kv_heads, rows -
// observe_from, L), a row each (Scissorhands' history). Keys past a row's chunk are not written:
// zero it first.
template <class T>
void attentionPrefill(const Blas& blas, const float* q, int64_t q_stride, const int* q_pos, const int* q_pos_host,
                      int rows, int heads, const T* K, const T* V, const int* k_pos, const int* k_pos_host, int L,
                      int kv_heads, int head_dim, int64_t capacity, float scale, T* out, size_t score_bytes,
                      float* observed = nullptr, int observe_from = 0, bool observe_rows = false);

// FlashAttention-2's scheme on mma.sync (kernels/cuda/flash_attention.cu): the same causal
// attention as attentionPrefill, scores never in memory, float32 accumulation and softmax; the
// probabilities are rounded to T for the product with V (as cuBLAS's path rounds them too).
template <class T>
bool flashAttentionFits(int head_dim);
template <class T>
void flashAttention(const float* q, int64_t q_stride, const int* q_pos, int rows, int heads, const T* K, const T* V,
                    const int* k_pos, int L, int kv_heads, int head_dim, int64_t capacity, float scale, T* out);

}  // namespace kvtp::cuda
