// CUDA twins of kernels/cpu_ops.cpp. Versions:
//   v1 (this file): the simplest correct kernels: one block per row (norms, softmax partials) or
//   per (query, head) (attention, scores in shared memory), elementwise kernels one thread per
//   element, GEMMs through cuBLAS sgemm. Checked against the CPU twins by
//   tests/cuda_kernels_test.cpp on the GPU machine.
#include <cfloat>

#include "kernels/cuda/cuda_ops.h"

namespace kvtp::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float warpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ double warpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ float warpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <class T, class Op>
__device__ T blockReduce(T v, Op warpOp, T identity) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warpOp(v);
  __syncthreads();  // partial may still be read from a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? partial[lane] : identity;
  if (warp == 0) v = warpOp(v);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  return partial[0];
}

__global__ void fillRows(float* y, const float* b, int T, int out, bool add) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * out) return;
  y[i] = add ? y[i] + b[i % out] : b[i % out];
}

__global__ void layerNormKernel(const float* x, int dim, const float* w, const float* b, float eps, float* y) {
  const float* r = x + int64_t(blockIdx.x) * dim;
  float* o = y + int64_t(blockIdx.x) * dim;
  float s = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += r[i];
  const float mean = blockReduce(s, warpSum, 0.0f) / dim;
  float v = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) v += (r[i] - mean) * (r[i] - mean);
  const float inv = rsqrtf(blockReduce(v, warpSum, 0.0f) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (r[i] - mean) * inv * w[i] + b[i];
}

__global__ void rmsNormKernel(const float* x, int dim, const float* w, float eps, float* y) {
  const float* r = x + int64_t(blockIdx.x) * dim;
  float* o = y + int64_t(blockIdx.x) * dim;
  float s = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += r[i] * r[i];
  const float inv = rsqrtf(blockReduce(s, warpSum, 0.0f) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = w[i] * (r[i] * inv);
}

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

// One block per (query t, head h): scores of all L entries in shared memory, softmax, then P·V.
__global__ void attentionKernel(const float* q, int q_stride, const int* q_pos, int heads, const float* K,
                                const float* V, const int* k_pos, int L, int kv_heads, int hd, float scale,
                                float* out) {
  extern __shared__ float smem[];  // [hd] query, then [L] scores
  float* qs = smem;
  float* s = smem + hd;
  const int t = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads);
  const float* qv = q + int64_t(t) * q_stride + int64_t(h) * hd;
  const float* Kh = K + int64_t(kvh) * L * hd;
  const float* Vh = V + int64_t(kvh) * L * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qv[d];
  __syncthreads();
  const int p = q_pos[t];
  float mx = -FLT_MAX;
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    float dot = 0;
    for (int d = 0; d < hd; ++d) dot += qs[d] * Kh[int64_t(l) * hd + d];
    s[l] = k_pos[l] <= p ? dot * scale : -FLT_MAX;
    mx = fmaxf(mx, s[l]);
  }
  mx = blockReduce(mx, warpMax, -FLT_MAX);
  float sum = 0;
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    s[l] = k_pos[l] <= p ? expf(s[l] - mx) : 0.0f;
    sum += s[l];
  }
  sum = blockReduce(sum, warpSum, 0.0f);
  const float inv = sum > 0 ? 1.0f / sum : 0.0f;
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int l = 0; l < L; ++l) acc += s[l] * Vh[int64_t(l) * hd + d];
    out[int64_t(t) * heads * hd + int64_t(h) * hd + d] = acc * inv;
  }
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

unsigned blocksFor(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

void linear(const Blas& blas, const float* x, int T, int in, const float* W, int out, const float* b, float* y,
            bool accumulate) {
  float beta = accumulate ? 1.0f : 0.0f;
  if (b) {
    fillRows<<<blocksFor(int64_t(T) * out), kThreads>>>(y, b, T, out, accumulate);
    KVTP_CUDA_LAUNCHED();
    beta = 1.0f;
  }
  const float alpha = 1.0f;
  // Row-major y (T, out) = x (T, in) W^T is column-major y^T (out, T) = W^T(col) x^T(col).
  KVTP_CUBLAS_CHECK(cublasSgemm(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &alpha, W, in, x, in, &beta, y, out));
}

void layerNorm(const float* x, int T, int dim, const float* w, const float* b, float eps, float* y) {
  layerNormKernel<<<T, kThreads>>>(x, dim, w, b, eps, y);
  KVTP_CUDA_LAUNCHED();
}

void rmsNorm(const float* x, int T, int dim, const float* w, float eps, float* y) {
  rmsNormKernel<<<T, kThreads>>>(x, dim, w, eps, y);
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

void attention(const float* q, int q_stride, const int* q_pos, int T, int heads, const float* K, const float* V,
               const int* k_pos, int L, int kv_heads, int head_dim, float scale, float* out) {
  const size_t smem = size_t(head_dim + L) * sizeof(float);
  if (smem > 48 * 1024) {
    static bool raised = false;  // opt in to more than 48 KB of dynamic shared memory once
    if (!raised) {
      KVTP_CUDA_CHECK(cudaFuncSetAttribute(attentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
      raised = true;
    }
  }
  attentionKernel<<<dim3(T, heads), 128, smem>>>(q, q_stride, q_pos, heads, K, V, k_pos, L, kv_heads, head_dim,
                                                  scale, out);
  KVTP_CUDA_LAUNCHED();
}

void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     kernels::SoftmaxPartial* out) {
  softmaxPartialsKernel<<<T, kThreads>>>(logits, V_shard, vocab_offset, targets, out);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
