// CUDA twins of kernels/cpu_ops.cpp, checked against them by tests/cuda_kernels_test.cpp on the
// GPU machine: elementwise ops, norms, RoPE, the float32 products, the softmax partials of a
// vocabulary shard. The decode attention (cuda_ops.h's attention): kernels/cuda/decode_attention.cu.
#include <algorithm>
#include <cfloat>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/forward_ops.h"

namespace kvtp::cuda {
namespace {

__global__ void addKernel(float* x, const float* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += y[i];
}
__global__ void reluKernel(float* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = fmaxf(x[i], 0.0f);
}
__global__ void siluMulKernel(float* g, const float* u, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// One thread per (token, head, pair); angles in double as on the CPU.
__global__ void ropeKernel(float* x, int T, int heads, int head_dim, const int* pos, const float* inv_freq) {
  const int half = head_dim / 2;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * heads * half) return;
  const int j = int(i % half), h = int((i / half) % heads), t = int(i / (int64_t(half) * heads));
  double s, c;
  sincos(double(pos[t]) * inv_freq[j], &s, &c);
  float* v = x + (int64_t(t) * heads + h) * head_dim;
  const float a = v[j], b = v[j + half];
  v[j] = a * float(c) - b * float(s);
  v[j + half] = b * float(c) + a * float(s);
}

__global__ void softmaxPartialsKernel(const float* logits, int V, int offset, const int* targets,
                                      kernels::SoftmaxPartial* out) {
  const float* row = logits + int64_t(blockIdx.x) * V;
  float mx = -FLT_MAX;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
  mx = blockReduce(mx, warpMax, -FLT_MAX);
  double sum = 0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) sum += exp(double(row[v] - mx));
  sum = blockReduce(sum, warpSumD, 0.0);
  if (threadIdx.x == 0) {
    kernels::SoftmaxPartial p;
    p.max = mx;
    p.sum = sum;
    const int local = targets[blockIdx.x] - offset;
    p.has_target = local >= 0 && local < V;
    p.target = p.has_target ? row[local] : 0.0f;
    out[blockIdx.x] = p;
  }
}

}  // namespace

void linear(const Blas& blas, const float* x, int T, int in, const float* W, int out, const float* b, float* y,
            bool accumulate) {
  gemmBlas(blas, x, T, in, W, out, b, y, accumulate);  // float32 compute: no TF32
}

void layerNorm(const float* x, int T, int dim, const float* w, const float* b, float eps, float* y) {
  normKernel<<<T, kThreads>>>(x, dim, w, b, eps, y);
  KVTP_CUDA_LAUNCHED();
}

void rmsNorm(const float* x, int T, int dim, const float* w, float eps, float* y) {
  normKernel<<<T, kThreads>>>(x, dim, w, nullptr, eps, y);
  KVTP_CUDA_LAUNCHED();
}

void addInPlace(float* x, const float* y, int64_t n) {
  addKernel<<<blocksFor(n), kThreads>>>(x, y, n);
  KVTP_CUDA_LAUNCHED();
}

void relu(float* x, int64_t n) {
  reluKernel<<<blocksFor(n), kThreads>>>(x, n);
  KVTP_CUDA_LAUNCHED();
}

void siluMul(float* g, const float* u, int64_t n) {
  siluMulKernel<<<blocksFor(n), kThreads>>>(g, u, n);
  KVTP_CUDA_LAUNCHED();
}

void applyRope(float* x, int T, int heads, int head_dim, const int* positions, const float* inv_freq) {
  ropeKernel<<<blocksFor(int64_t(T) * heads * (head_dim / 2)), kThreads>>>(x, T, heads, head_dim, positions, inv_freq);
  KVTP_CUDA_LAUNCHED();
}


void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     kernels::SoftmaxPartial* out) {
  // 1024 threads: a decode step has one row of ~32k logits, and each takes a double exp.
  softmaxPartialsKernel<<<T, 1024>>>(logits, V_shard, vocab_offset, targets, out);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
