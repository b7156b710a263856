// The CPU backend's math on plain float32 buffers (row-major). Every CUDA kernel gets its twin
// here; tests compare them. Shapes are given as (rows, columns); x is (T, in) unless said.
#pragma once
#include <cstdint>
#include <vector>

namespace kvtp::kernels {

// y (T, out) = x (T, in) · W^T + b, W stored (out, in) as in PyTorch's nn.Linear; b may be null.
// With accumulate, y += ... instead (residual adds fused into the product).
void linear(const float* x, int T, int in, const float* W, int out, const float* b, float* y,
            bool accumulate = false);

void layerNorm(const float* x, int T, int dim, const float* w, const float* b, float eps, float* y);
void rmsNorm(const float* x, int T, int dim, const float* w, float eps, float* y);
void addInPlace(float* x, const float* y, int64_t n);
void relu(float* x, int64_t n);
// gate <- silu(gate) * up (SwiGLU), elementwise.
void siluMul(float* gate, const float* up, int64_t n);

// Rotary embedding in Hugging Face's rotate_half layout: within each head, element i pairs with
// i + head_dim/2. x is (T, heads*head_dim); inv_freq has head_dim/2 entries.
void applyRope(float* x, int T, int heads, int head_dim, const int* positions, const float* inv_freq);

// Causal attention of T queries of one head over L cached keys/values of its KV head:
// a query at position p sees the keys at positions <= p. q rows have stride q_stride, out rows
// out_stride; K and V are (L, head_dim) with k_pos ascending (the cache keeps token order).
// If probs is non-null it receives the (T, L) attention
// weights (what eviction policies score tokens by).
void attendHead(const float* q, int q_stride, const int* q_pos, int T, const float* K, const float* V,
                const int* k_pos, int L, int head_dim, float scale, float* out, int out_stride,
                float* probs = nullptr);

// What one shard of a vocabulary contributes to a row's log-softmax: its max logit, the sum of
// exp(logit - max), and the target's logit if the target lies in the shard. Partials of
// different shards combine (combine()), so the full vocabulary never needs gathering.
struct SoftmaxPartial {
  float max = -3.0e38f;
  double sum = 0.0;
  float target = 0.0f;
  bool has_target = false;
  void combine(const SoftmaxPartial& o);
  double logprob() const;  // target - logsumexp
};
// logits is (T, V_shard) covering token ids [vocab_offset, vocab_offset + V_shard).
void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     SoftmaxPartial* out);

}  // namespace kvtp::kernels
