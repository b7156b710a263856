// Kernels of the GPU forward pass (forward_ops.h). Decode (one token) is bound by reading the
// weights, so its GEMV streams each weight row once with 16-byte loads; prefill is bound by
// GEMM throughput, left to cuBLAS (tensor cores for fp16/bf16), attention included.
#include <algorithm>
#include <cfloat>
#include <stdexcept>
#include <string>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/forward_ops.h"

namespace kvtp::cuda {
namespace {

template <class T>
cudaDataType_t dataType() {
  if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else return CUDA_R_32F;
}

// Dot product of one x with a weight row, one warp per row: lanes stride the row in 16-byte
// vectors, four in flight each; weights are streamed once, so they bypass the caches.
template <class T>
__device__ float warpDot(const T* x, const T* w, int in) {
  constexpr int V = 16 / sizeof(T);
  const uint4* w4 = reinterpret_cast<const uint4*>(w);
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  const int n4 = in / V;
  float s = 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x % 32; i < n4; i += 32) {
    const uint4 wv = __ldcs(w4 + i);
    const uint4 xv = __ldg(x4 + i);
    const T* wp = reinterpret_cast<const T*>(&wv);
    const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int j = 0; j < V; ++j) s += toFloat(wp[j]) * toFloat(xp[j]);
  }
  return warpSum(s);
}

template <class T>
__global__ void gemvKernel(const T* x, const T* W, int in, int out, const float* bias, float* y, bool accumulate) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= out) return;
  const float s = warpDot(x, W + int64_t(row) * in, in);
  if (threadIdx.x % 32 == 0) y[row] = s + (bias ? bias[row] : 0.0f) + (accumulate ? y[row] : 0.0f);
}

// The MLP's input product with its activation as the epilogue, for one token: act[f] =
// silu(gate_f . x) * (up_f . x) (W = gate rows then up rows, a warp reads both of its rows) or
// relu(w_f . x). The (1, 2F) float product never goes to memory.
template <class T, Activation A>
__global__ void gemvActivationKernel(const T* x, const T* W, int in, int F, const float* bias, T* act) {
  const int f = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (f >= F) return;
  float a = warpDot(x, W + int64_t(f) * in, in) + (bias ? bias[f] : 0.0f);
  if constexpr (A == Activation::SiluMul) {
    const float up = warpDot(x, W + int64_t(F + f) * in, in) + (bias ? bias[F + f] : 0.0f);
    a = a / (1.0f + expf(-a)) * up;
  } else {
    a = fmaxf(a, 0.0f);
  }
  if (threadIdx.x % 32 == 0) act[f] = fromFloat<T>(a);
}

template <class T>
__global__ void convertKernel(const float* in, int64_t n, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = fromFloat<T>(in[i]);
}

template <class T>
__global__ void embedKernel(const int* tokens, const T* table, int begin, int end, int dim, float* out) {
  const int t = blockIdx.x, id = tokens[t];
  const bool mine = id >= begin && id < end;
  for (int d = threadIdx.x; d < dim; d += blockDim.x)
    out[int64_t(t) * dim + d] = mine ? toFloat(table[int64_t(id - begin) * dim + d]) : 0.0f;
}

__global__ void addPositionsKernel(float* x, int dim, const float* table, const int* positions, int offset) {
  const int t = blockIdx.x;
  const float* r = table + int64_t(positions[t] + offset) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) x[int64_t(t) * dim + d] += r[d];
}

// Grid (rows, items / blockDim): a thread takes one (head, pair) of the Q and K heads, or one
// channel of V — a decode step's single row spreads over many SMs.
template <class T>
__global__ void ropeAppendKernel(float* qkv, int q_heads, int kv_heads, int hd, const int* pos, const float* inv_freq,
                                 T* K, T* V, int* k_pos, int64_t capacity, const int* first) {
  const int t = blockIdx.x, half = hd / 2, Q = q_heads * hd, KV = kv_heads * hd, pairs = (q_heads + kv_heads) * half;
  float* row = qkv + int64_t(t) * (Q + 2 * KV);
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i < pairs) {
    const int head = i / half, j = i % half;
    float* v = row + int64_t(head) * hd;  // K heads follow the Q heads
    float a = v[j], b = v[j + half];
    if (inv_freq) {
      double s, c;
      sincos(double(pos[t]) * inv_freq[j], &s, &c);
      const float ra = a * float(c) - b * float(s), rb = b * float(c) + a * float(s);
      v[j] = a = ra;
      v[j + half] = b = rb;
    }
    if (head >= q_heads) {
      const int g = head - q_heads;
      const int64_t slot = first[g] + t;
      T* k = K + (g * capacity + slot) * hd;
      k[j] = fromFloat<T>(a);
      k[j + half] = fromFloat<T>(b);
      if (j == 0) k_pos[g * capacity + slot] = pos[t];
    }
  } else if (i < pairs + KV) {
    const int c = i - pairs, g = c / hd;
    V[(g * capacity + first[g] + t) * hd + c % hd] = fromFloat<T>(row[Q + KV + c]);
  }
}

// qp[h][t][d] = T(q[t0 + t][h * hd + d] * scale): each KV head's G query heads stacked in rows.
template <class T>
__global__ void packQueries(const float* q, int64_t stride, int t0, int rows, int heads, int hd, float scale, T* qp) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * heads * hd) return;
  const int d = int(i % hd), t = int((i / hd) % rows), h = int(i / (int64_t(hd) * rows));
  qp[i] = fromFloat<T>(q[(t0 + t) * stride + int64_t(h) * hd + d] * scale);
}

// One block per score row (head h, query t): softmax over the keys at positions <= the query's.
template <class T>
__global__ void maskedSoftmax(const float* S, int rows, int L, const int* q_pos, const int* k_pos, T* P) {
  const int64_t r = blockIdx.x;
  const int p = q_pos[r % rows];
  const float* s = S + r * L;
  T* out = P + r * L;
  float mx = -FLT_MAX;
  for (int l = threadIdx.x; l < L; l += blockDim.x)
    if (k_pos[l] <= p) mx = fmaxf(mx, s[l]);
  mx = blockReduce(mx, warpMax, -FLT_MAX);
  float sum = 0.0f;
  for (int l = threadIdx.x; l < L; l += blockDim.x)
    if (k_pos[l] <= p) sum += expf(s[l] - mx);
  const float inv = 1.0f / blockReduce(sum, warpSum, 0.0f);
  for (int l = threadIdx.x; l < L; l += blockDim.x) out[l] = fromFloat<T>(k_pos[l] <= p ? expf(s[l] - mx) * inv : 0.0f);
}

// out[t0 + t][h * hd + d] = O[h][t][d].
template <class T>
__global__ void unpackHeads(const float* O, int t0, int rows, int heads, int hd, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * heads * hd) return;
  const int d = int(i % hd), t = int((i / hd) % rows), h = int(i / (int64_t(hd) * rows));
  out[(int64_t(t0) + t) * heads * hd + int64_t(h) * hd + d] = fromFloat<T>(O[i]);
}

template <class T>
__global__ void siluMulKernel(const float* gu, int rows, int F, T* act) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * F) return;
  const int64_t t = i / F, f = i % F;
  const float g = gu[t * 2 * F + f], u = gu[t * 2 * F + F + f];
  act[i] = fromFloat<T>(g / (1.0f + expf(-g)) * u);
}

template <class T>
__global__ void reluKernel(const float* in, int64_t n, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = fromFloat<T>(fmaxf(in[i], 0.0f));
}

}  // namespace

template <class T>
void gemmBlas(const Blas& blas, const T* x, int rows, int in, const T* W, int out, const float* bias, float* y,
              bool accumulate) {
  float beta = accumulate ? 1.0f : 0.0f;
  if (bias) {
    fillRows<<<blocksFor(int64_t(rows) * out), kThreads>>>(y, bias, rows, out, accumulate);
    KVTP_CUDA_LAUNCHED();
    beta = 1.0f;
  }
  const float alpha = 1.0f;
  // Row-major y (rows, out) = x W^T is column-major y^T (out, rows) = W^T(col) x^T(col).
  KVTP_CUBLAS_CHECK(cublasGemmEx(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, W, dataType<T>(), in, x,
                                 dataType<T>(), in, &beta, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// One row whose vectors can be read 16 bytes at a time goes through the GEMV kernels.
template <class T>
bool gemvFits(const T* x, int rows, int in, const T* W) {
  constexpr int V = 16 / sizeof(T);
  return rows == 1 && in % V == 0 && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(W)) % 16 == 0;
}
constexpr int kGemvRowsPerBlock = 8;

template <class T>
void gemm(const Blas& blas, const T* x, int rows, int in, const T* W, int out, const float* bias, float* y,
          bool accumulate) {
  if (!gemvFits(x, rows, in, W)) return gemmBlas(blas, x, rows, in, W, out, bias, y, accumulate);
  gemvKernel<<<(out + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock, 32 * kGemvRowsPerBlock>>>(x, W, in, out, bias, y,
                                                                                           accumulate);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void gemmActivation(const Blas& blas, const T* x, int rows, int in, const T* W, int F, const float* bias,
                    Activation act, float* scratch, T* out) {
  if (gemvFits(x, rows, in, W)) {
    const unsigned blocks = (F + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
    auto kernel = act == Activation::SiluMul ? gemvActivationKernel<T, Activation::SiluMul>
                                             : gemvActivationKernel<T, Activation::Relu>;
    kernel<<<blocks, 32 * kGemvRowsPerBlock>>>(x, W, in, F, bias, out);
    KVTP_CUDA_LAUNCHED();
    return;
  }
  if (act == Activation::SiluMul) {
    gemmBlas(blas, x, rows, in, W, 2 * F, bias, scratch, false);
    siluMulKernel<<<blocksFor(int64_t(rows) * F), kThreads>>>(scratch, rows, F, out);
  } else {
    gemmBlas(blas, x, rows, in, W, F, bias, scratch, false);
    reluKernel<<<blocksFor(int64_t(rows) * F), kThreads>>>(scratch, int64_t(rows) * F, out);
  }
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void convert(const float* in, int64_t n, T* out) {
  if (n == 0) return;
  convertKernel<<<blocksFor(n), kThreads>>>(in, n, out);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void embed(const int* tokens, int rows, const T* table, int vocab_begin, int vocab_end, int dim, float* out) {
  embedKernel<<<rows, kThreads>>>(tokens, table, vocab_begin, vocab_end, dim, out);
  KVTP_CUDA_LAUNCHED();
}

void addPositions(float* x, int rows, int dim, const float* table, const int* positions, int offset) {
  addPositionsKernel<<<rows, kThreads>>>(x, dim, table, positions, offset);
  KVTP_CUDA_LAUNCHED();
}

template <class O>
void layerNormTo(const float* x, int rows, int dim, const float* w, const float* b, float eps, O* y) {
  layerNormKernel<<<rows, kThreads>>>(x, dim, w, b, eps, y);
  KVTP_CUDA_LAUNCHED();
}

template <class O>
void rmsNormTo(const float* x, int rows, int dim, const float* w, float eps, O* y) {
  rmsNormKernel<<<rows, kThreads>>>(x, dim, w, eps, y);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void ropeAppendKV(float* qkv, int rows, int q_heads, int kv_heads, int head_dim, const int* positions,
                  const float* inv_freq, T* K, T* V, int* k_pos, int64_t capacity, const int* first_slots) {
  const int items = (q_heads + kv_heads) * head_dim / 2 + kv_heads * head_dim;
  ropeAppendKernel<<<dim3(rows, (items + 127) / 128), 128>>>(qkv, q_heads, kv_heads, head_dim, positions, inv_freq, K,
                                                              V, k_pos, capacity, first_slots);
  KVTP_CUDA_LAUNCHED();
}

// observed[g][l] += the probabilities of key l summed over KV head g's query heads and the
// chunk's query rows from `from` on. P: (heads, rows, Lk), each KV head's G heads consecutive.
template <class T>
__global__ void observeKernel(const T* P, int rows, int Lk, int G, int from, int64_t L, float* observed) {
  const int g = blockIdx.y, l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= Lk) return;
  float s = 0.0f;
  for (int h = g * G; h < (g + 1) * G; ++h)
    for (int t = from; t < rows; ++t) s += toFloat(P[(int64_t(h) * rows + t) * Lk + l]);
  observed[g * L + l] += s;
}

// Gathers the kept rows of every head into `scratch`, then back to the head's first slots.
template <class T>
__global__ void gatherRows(const T* K, const T* V, const int* k_pos, int64_t capacity, int hd, const int* keep,
                           const int* kept, int max_kept, T* sk, T* sv, int* sp) {
  const int g = blockIdx.y, j = blockIdx.x;
  if (j >= kept[g]) return;
  const int64_t from = g * capacity + keep[int64_t(g) * max_kept + j], to = int64_t(g) * max_kept + j;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    sk[to * hd + d] = K[from * hd + d];
    sv[to * hd + d] = V[from * hd + d];
  }
  if (threadIdx.x == 0) sp[to] = k_pos[from];
}

template <class T>
__global__ void scatterRows(T* K, T* V, int* k_pos, int64_t capacity, int hd, const int* kept, int max_kept,
                            const T* sk, const T* sv, const int* sp) {
  const int g = blockIdx.y, j = blockIdx.x;
  if (j >= kept[g]) return;
  const int64_t to = g * capacity + j, from = int64_t(g) * max_kept + j;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    K[to * hd + d] = sk[from * hd + d];
    V[to * hd + d] = sv[from * hd + d];
  }
  if (threadIdx.x == 0) k_pos[to] = sp[from];
}

template <class T>
void compactKV(T* K, T* V, int* k_pos, int64_t capacity, int kv_heads, int head_dim, const int* keep, const int* kept,
               int max_kept) {
  if (max_kept == 0) return;
  static thread_local DeviceBuffer<char> scratch;
  const size_t rows = size_t(kv_heads) * max_kept;
  char* base = grow(scratch, rows * (2 * head_dim * sizeof(T) + sizeof(int)));
  T* sk = reinterpret_cast<T*>(base);
  T* sv = sk + rows * head_dim;
  int* sp = reinterpret_cast<int*>(sv + rows * head_dim);
  const dim3 grid(max_kept, kv_heads);
  const int threads = std::min(head_dim, 128);
  gatherRows<<<grid, threads>>>(K, V, k_pos, capacity, head_dim, keep, kept, max_kept, sk, sv, sp);
  KVTP_CUDA_LAUNCHED();
  scatterRows<<<grid, threads>>>(K, V, k_pos, capacity, head_dim, kept, max_kept, sk, sv, sp);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void attentionPrefill(const Blas& blas, const float* q, int64_t q_stride, const int* q_pos, const int* q_pos_host,
                      int rows, int heads, const T* K, const T* V, const int* k_pos, const int* k_pos_host, int L,
                      int kv_heads, int hd, int64_t capacity, float scale, T* out, size_t score_bytes,
                      float* observed, int observe_from) {
  if (rows == 0 || L == 0) return;
  // Tensor-core flash attention for every row whose probabilities nobody asked for.
  int first = 0;
  if (flashAttentionFits<T>(hd)) {
    first = observed ? std::clamp(observe_from, 0, rows) : rows;
    flashAttention(q, q_stride, q_pos, first, heads, K, V, k_pos, L, kv_heads, hd, capacity, scale, out);
  }
  if (first == rows) return;
  const int G = heads / kv_heads;
  // Per query row: scores (float) and probabilities (T) over up to L keys, for every head.
  const size_t per_row = size_t(heads) * (size_t(L) * (sizeof(float) + sizeof(T)) + hd * (sizeof(float) + sizeof(T)));
  // At most 512 queries a chunk: a chunk scores only the keys up to its last query, so smaller
  // chunks skip more of the causal mask's upper triangle (5/8 of a 2048 square at 512).
  const int chunk = int(std::clamp<size_t>(score_bytes / per_row, 1, std::min(rows - first, 512)));
  static thread_local DeviceBuffer<char> scratch;
  const size_t qp_n = size_t(heads) * chunk * hd, s_n = size_t(heads) * chunk * L;
  char* base = grow(scratch, qp_n * sizeof(T) + s_n * (sizeof(float) + sizeof(T)) + qp_n * sizeof(float) + 64);
  // Carve: S (float), O (float), P (T), qp (T): float parts first keep every part aligned.
  float* S = reinterpret_cast<float*>(base);
  float* O = S + s_n;
  T* P = reinterpret_cast<T*>(O + qp_n);
  T* qp = P + s_n;
  const float one = 1.0f, zero = 0.0f;
  for (int t0 = first; t0 < rows; t0 += chunk) {
    const int rc = std::min(chunk, rows - t0);
    // Keys at positions up to the chunk's last query (the cache keeps positions ascending).
    const int Lk = int(std::upper_bound(k_pos_host, k_pos_host + L, q_pos_host[t0 + rc - 1]) - k_pos_host);
    if (Lk == 0) throw std::runtime_error("cuda::attentionPrefill: a query sees no key");
    const int M = G * rc;  // score rows per KV head
    packQueries<<<blocksFor(int64_t(rc) * heads * hd), kThreads>>>(q, q_stride, t0, rc, heads, hd, scale, qp);
    KVTP_CUDA_LAUNCHED();
    KVTP_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, Lk, M, hd, &one, K, dataType<T>(), hd, capacity * hd, qp, dataType<T>(),
        hd, int64_t(M) * hd, &zero, S, CUDA_R_32F, Lk, int64_t(M) * Lk, kv_heads, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT));
    maskedSoftmax<<<unsigned(heads) * rc, kThreads>>>(S, rc, Lk, q_pos + t0, k_pos, P);
    KVTP_CUDA_LAUNCHED();
    if (observed && t0 + rc > observe_from) {
      observeKernel<<<dim3((Lk + 127) / 128, kv_heads), 128>>>(P, rc, Lk, G, std::max(0, observe_from - t0), L, observed);
      KVTP_CUDA_LAUNCHED();
    }
    KVTP_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas.get(), CUBLAS_OP_N, CUBLAS_OP_N, hd, M, Lk, &one, V, dataType<T>(), hd, capacity * hd, P, dataType<T>(),
        Lk, int64_t(M) * Lk, &zero, O, CUDA_R_32F, hd, int64_t(M) * hd, kv_heads, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT));
    unpackHeads<<<blocksFor(int64_t(rc) * heads * hd), kThreads>>>(O, t0, rc, heads, hd, out);
    KVTP_CUDA_LAUNCHED();
  }
}

#define KVTP_FORWARD_OPS(T)                                                                                         \
  template void gemm<T>(const Blas&, const T*, int, int, const T*, int, const float*, float*, bool);               \
  template void gemmBlas<T>(const Blas&, const T*, int, int, const T*, int, const float*, float*, bool);           \
  template void gemmActivation<T>(const Blas&, const T*, int, int, const T*, int, const float*, Activation, float*, \
                                  T*);                                                                            \
  template void convert<T>(const float*, int64_t, T*);                                                             \
  template void embed<T>(const int*, int, const T*, int, int, int, float*);                                       \
  template void layerNormTo<T>(const float*, int, int, const float*, const float*, float, T*);                     \
  template void rmsNormTo<T>(const float*, int, int, const float*, float, T*);                                     \
  template void ropeAppendKV<T>(float*, int, int, int, int, const int*, const float*, T*, T*, int*, int64_t,     \
                                const int*);                                                                      \
  template void compactKV<T>(T*, T*, int*, int64_t, int, int, const int*, const int*, int);                       \
  template void attentionPrefill<T>(const Blas&, const float*, int64_t, const int*, const int*, int, int, const T*, \
                                    const T*, const int*, const int*, int, int, int, int64_t, float, T*, size_t,   \
                                    float*, int);
KVTP_FORWARD_OPS(float)
KVTP_FORWARD_OPS(__half)
KVTP_FORWARD_OPS(__nv_bfloat16)
#undef KVTP_FORWARD_OPS

}  // namespace kvtp::cuda
