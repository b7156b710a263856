// CUDA twins of kernels/cpu_ops.cpp, checked against them by tests/cuda_kernels_test.cpp on the
// GPU machine and timed by bench/cuda_bench.cpp (docs/BENCHMARKS.md). Versions:
//   v1: the simplest correct kernels: one block per row (norms, softmax partials), elementwise
//       kernels one thread per element, GEMMs through cuBLAS sgemm; attention one block per
//       (query, head) with all scores in shared memory — 1-2 % of the copy bandwidth at decode
//       on an H100 (32 blocks for 132 SMs, each thread walking a key row: uncoalesced).
//   v2 (attention): flash-decoding — keys split over many blocks, one warp per key row (lanes
//       read consecutive channels: coalesced), online softmax per warp, a second kernel combines
//       the splits.
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

// Attention v2. Grid (heads, splits, T): a block scores keys [split * kChunk, +kChunk) of one
// head for one query; each warp takes every 4th key, its lanes hold channels lane + 32 i of the
// query and of the output accumulator (head_dim <= 256). Writes the block's unnormalised output
// with its running max and sum; attentionCombine merges the splits.
constexpr int kChunk = 256, kWarps = 4, kMaxPerLane = 8;

__global__ void attentionSplit(const float* q, int q_stride, const int* q_pos, int heads, const float* K,
                               const float* V, const int* k_pos, int L, int kv_heads, int hd, int64_t head_stride,
                               float scale, int splits, float* part_o, float* part_ms) {
  const int h = blockIdx.x, split = blockIdx.y, t = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, per_lane = hd / 32;
  const int kvh = h / (heads / kv_heads);
  const float* Kh = K + kvh * head_stride;
  const float* Vh = V + kvh * head_stride;
  const float* qv = q + int64_t(t) * q_stride + int64_t(h) * hd;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  for (int i = 0; i < per_lane; ++i) {
    qr[i] = qv[lane + 32 * i] * scale;
    acc[i] = 0.0f;
  }
  const int p = q_pos[t];
  float m = -FLT_MAX, sum = 0.0f;
  const int end = min(L, (split + 1) * kChunk);
  for (int l = split * kChunk + warp; l < end; l += kWarps) {
    if (k_pos[l] > p) continue;  // the same for the whole warp
    const float* kr = Kh + int64_t(l) * hd;
    float dot = 0.0f;
    for (int i = 0; i < per_lane; ++i) dot += qr[i] * kr[lane + 32 * i];
    dot = warpSum(dot);
    const float m_new = fmaxf(m, dot), corr = expf(m - m_new), w = expf(dot - m_new);
    sum = sum * corr + w;
    const float* vr = Vh + int64_t(l) * hd;
    for (int i = 0; i < per_lane; ++i) acc[i] = acc[i] * corr + w * vr[lane + 32 * i];
    m = m_new;
  }
  // Merge the block's warps through shared memory, then write this split's partial.
  __shared__ float s_m[kWarps], s_sum[kWarps], s_acc[kWarps][256];
  if (lane == 0) s_m[warp] = m, s_sum[warp] = sum;
  for (int i = 0; i < per_lane; ++i) s_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float M = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w]);
  float S = 0.0f;
  for (int w = 0; w < kWarps; ++w) S += s_sum[w] * (s_m[w] == -FLT_MAX ? 0.0f : expf(s_m[w] - M));
  const int64_t slot = (int64_t(t) * heads + h) * splits + split;
  for (int i = 0; i < per_lane; ++i) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (s_m[w] != -FLT_MAX) o += s_acc[w][lane + 32 * i] * expf(s_m[w] - M);
    part_o[slot * hd + lane + 32 * i] = o;
  }
  if (lane == 0) part_ms[slot * 2] = M, part_ms[slot * 2 + 1] = S;
}

// One block per (query, head): out = sum_j o_j e^(m_j - M) / sum_j s_j e^(m_j - M).
__global__ void attentionCombine(const float* part_o, const float* part_ms, int splits, int heads, int hd,
                                 float* out) {
  const int h = blockIdx.x, t = blockIdx.y;
  const int64_t base = (int64_t(t) * heads + h) * splits;
  float M = -FLT_MAX;
  for (int j = 0; j < splits; ++j) M = fmaxf(M, part_ms[(base + j) * 2]);
  float S = 0.0f;
  for (int j = 0; j < splits; ++j) {
    const float mj = part_ms[(base + j) * 2];
    if (mj != -FLT_MAX) S += part_ms[(base + j) * 2 + 1] * expf(mj - M);
  }
  const float inv = S > 0.0f ? 1.0f / S : 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int j = 0; j < splits; ++j) {
      const float mj = part_ms[(base + j) * 2];
      if (mj != -FLT_MAX) o += part_o[(base + j) * hd + d] * expf(mj - M);
    }
    out[(int64_t(t) * heads + h) * hd + d] = o * inv;
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
               const int* k_pos, int L, int kv_heads, int head_dim, int64_t head_stride, float scale, float* out) {
  if (head_dim % 32 != 0 || head_dim > 32 * kMaxPerLane)
    throw std::runtime_error("cuda::attention: head_dim " + std::to_string(head_dim) + " must be a multiple of 32, at most 256");
  if (L == 0 || T == 0) return;
  const int splits = (L + kChunk - 1) / kChunk;
  // Partials live in a grow-only scratch buffer: steady-state decode allocates nothing.
  static thread_local DeviceBuffer<float> scratch;
  const size_t need = size_t(T) * heads * splits * (head_dim + 2);
  if (scratch.size() < need) scratch = DeviceBuffer<float>(need);
  float* part_o = scratch.get();
  float* part_ms = part_o + size_t(T) * heads * splits * head_dim;
  attentionSplit<<<dim3(heads, splits, T), 32 * kWarps>>>(q, q_stride, q_pos, heads, K, V, k_pos, L, kv_heads, head_dim,
                                                          head_stride, scale, splits, part_o, part_ms);
  KVTP_CUDA_LAUNCHED();
  attentionCombine<<<dim3(heads, T), 128>>>(part_o, part_ms, splits, heads, head_dim, out);
  KVTP_CUDA_LAUNCHED();
}

void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     kernels::SoftmaxPartial* out) {
  softmaxPartialsKernel<<<T, kThreads>>>(logits, V_shard, vocab_offset, targets, out);
  KVTP_CUDA_LAUNCHED();
}

}  // namespace kvtp::cuda
