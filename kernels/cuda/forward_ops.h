// The kernels of the GPU forward pass (runtime/gpu_engine.cu) beyond the float twins of
// cuda_ops.h: mixed precision (T = float, __half or __nv_bfloat16 storage; float math and
// accumulation), row strides for the fused QKV projection, and the full-precision KV cache's
// layout [kv_head][capacity][head_dim] (its compressed forms: cache_ops.h). Their CPU
// counterparts are the float kernels of cpu_ops.h; the engine as a whole is compared with the CPU
// model (tests/cuda_engine_test.cpp).
#pragma once
#include <cstdint>

#include "kernels/cuda/cache_ops.h"
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
