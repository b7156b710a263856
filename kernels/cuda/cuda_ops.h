// The CUDA twins of kernels/cpu_ops.h: same arguments and layouts, device pointers, float32
// storage and accumulation (the fp16/bf16 forward pass builds on these). Each launch is
// checked; tests/cuda_kernels_test.cpp compares every one with its CPU twin.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cpu_ops.h"
#include "kernels/cuda/cuda_util.h"

namespace kvtp::cuda {

// y (T, out) = x (T, in) · W^T + b (+ y if accumulate), W (out, in) row-major, through cuBLAS in
// strict float32 (no TF32), so it can match the CPU backend to 1e-5.
void linear(const Blas& blas, const float* x, int T, int in, const float* W, int out, const float* b, float* y,
            bool accumulate = false);

void layerNorm(const float* x, int T, int dim, const float* w, const float* b, float eps, float* y);
void rmsNorm(const float* x, int T, int dim, const float* w, float eps, float* y);
void addInPlace(float* x, const float* y, int64_t n);
void relu(float* x, int64_t n);
void siluMul(float* gate, const float* up, int64_t n);
void applyRope(float* x, int T, int heads, int head_dim, const int* positions, const float* inv_freq);

// Causal attention of T queries of `heads` query heads (rows of stride q_stride) over L cached
// entries per KV head: KV head g's keys start at K + g * head_stride, (L, head_dim) row-major
// (values likewise); k_pos (L) ascending. Query head h reads KV head h / (heads / kv_heads), any ratio
// (a KV head's rows are read once per block of up to 8 of its query heads).
// out (T, heads * head_dim). head_dim 8, 16, 32, 64, 128 or 256; any L. The cache K/V and out are float,
// __half or __nv_bfloat16 (instantiated with out of the cache's type); math is float32.
// A compressed cache (heads of different lengths): `lengths` (device, kv_heads) replaces L per
// head (L is then a bound on them, e.g. the capacity: the launch depends on L alone) and KV head
// g's positions start at k_pos + g * pos_stride.
// An int8 cache (KT = int8_t) passes `int8`: see Int8Rows. A KIVI cache (KT = uint8_t, K / V
// unused) passes `kivi` (cache_ops.h): each head's first quantized[g] rows are codes, decoded in
// registers as the CPU decodes them, the rest full-precision rows of its ring.
// A batch of sequences (rows_are_sequences): query row t is sequence t's, and reads KV heads
// t * kv_heads .. (t + 1) * kv_heads - 1 (lengths, positions and weights' rows indexed alike).
// weights, if not null: (T, kv_heads, L) float, the attention probabilities of each KV head's
// entries summed over its query heads (what eviction policies score by; 0 for an entry the query
// does not see; entries past a head's length are left as they were).
struct Int8Rows;
template <class T>
struct KiviCache;
template <class KT, class OT>
void attention(const float* q, int q_stride, const int* q_pos, int T, int heads, const KT* K, const KT* V,
               const int* k_pos, int L, int kv_heads, int head_dim, int64_t head_stride, float scale, OT* out,
               const int* lengths = nullptr, int64_t pos_stride = 0, float* weights = nullptr,
               const Int8Rows* int8 = nullptr, bool rows_are_sequences = false, const KiviCache<OT>* kivi = nullptr);

// How attention reads an int8 cache (kv::KVCache's Int8 form): row l of KV head g is its codes x
// the row's step (k_step / v_step [g * pos_stride + l]) — except the rows this step appended
// (l >= fresh_from[g]), which it reads at full precision from the step's projection: the key of
// the j-th new row at fresh_k + j * fresh_stride + g * head_dim (values likewise), as the CPU
// quantizes a step's rows only after the step. In a batch, sequence t's new row is row t.
struct Int8Rows {
  const float *k_step, *v_step;
  const float *fresh_k, *fresh_v;
  int64_t fresh_stride;
  const int* fresh_from;
};

// Per row of logits (T, V_shard): max, sum of exp(logit - max), target logit (as the CPU twin).
void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     kernels::SoftmaxPartial* out);

}  // namespace kvtp::cuda
