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

// The decode GEMV (one row of x): one warp per weight row, lanes striding it in 16-byte vectors
// with four loads in flight each; the weights are streamed once, so they bypass the caches. x
// sits in shared memory (each block reads it once); the epilogue stores, activates, or applies
// RoPE and appends to the KV cache. Launched dependent, each warp requests its row's first
// vectors while the kernel before finishes (WeightRow). A Llama decode step's RMSNorms live in
// these kernels too (DeferredNorm): the residual's product emits x ∘ w and its sums of squares,
// the next scales its dots. (Normalizing x in every block's prologue was built and measured
// slower than a norm kernel; the deferred form leaves no norm work at all between products.)
constexpr int kGemvWarps = 16;
__host__ __device__ constexpr int gemvBlocks(int rows) { return (rows + kGemvWarps - 1) / kGemvWarps; }

template <class T>
struct GemvArgs {
  const T* x;
  const T* W;
  int in_dim, out;  // W is (out, in_dim); out counts the epilogue's outputs (F for SiluMul)
  const float* bias;
  float* y;  // Store, RopeAppend: float outputs
  bool accumulate;
  T* act;  // SiluMul, Relu: activations
  KvAppend<T> kv;  // RopeAppend
  DeferredNorm<T> emit = {}, normed = {};  // Store: writes emit's fed row and sums; x is normed's fed row
};

enum class Epilogue { Store, SiluMul, Relu, RopeAppend };

// A warp's weight row for one product with x: each lane requests its first kEarly 16-byte vectors
// before the kernel waits for the one before it (launchDependent: the weights never change, so
// the loads overlap that kernel's tail), the rest four in flight at a time once x is staged.
// (8 early vectors; 4 for SiluMul's two rows, which would otherwise cost blocks an SM.)
template <class T, int kEarly>
struct WeightRow {
  const uint4* w = nullptr;
  uint4 early[kEarly];
  __device__ void request(const T* row, int in) {
    w = reinterpret_cast<const uint4*>(row);
    const int lane = threadIdx.x % 32, n4 = in * int(sizeof(T)) / 16;
#pragma unroll
    for (int e = 0; e < kEarly; ++e) early[e] = lane + 32 * e < n4 ? __ldcs(w + lane + 32 * e) : uint4{};
  }
  __device__ float dot(const uint4* xs, int in) const {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x % 32, n4 = in / V;
    float s = 0.0f;
    auto add = [&](const uint4& wv, const uint4& xv) {
      const T* wp = reinterpret_cast<const T*>(&wv);
      const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int j = 0; j < V; ++j) s += toFloat(wp[j]) * toFloat(xp[j]);
    };
#pragma unroll
    for (int e = 0; e < kEarly; ++e)
      if (lane + 32 * e < n4) add(early[e], xs[lane + 32 * e]);
#pragma unroll 4
    for (int i = lane + 32 * kEarly; i < n4; i += 32) add(__ldcs(w + i), xs[i]);
    return warpSum(s);
  }
};

// One (head, pair) of the Q and K heads of new row t, given the pair's product (x0, x1) =
// channels (j, j + head_dim / 2): rotated by the RoPE table into `row` (the row's q|k|v) and, for a
// K head, appended to the cache with the row's position. Shared by both ways of appending.
template <class T>
__device__ void ropeAppendPair(const KvAppend<T>& kv, int t, int head, int j, float x0, float x1, float* row) {
  const int hd = kv.head_dim, half = hd / 2;
  if (kv.rope) {
    const float2 cs = kv.rope[int64_t(t) * half + j];
    const float r0 = x0 * cs.x - x1 * cs.y, r1 = x1 * cs.x + x0 * cs.y;
    x0 = r0;
    x1 = r1;
  }
  row[head * hd + j] = x0;
  row[head * hd + j + half] = x1;
  if (head < kv.q_heads || !kv.K) return;
  const int64_t slot = newRow(kv, t, head - kv.q_heads, kv.kv_heads);
  kv.K[slot * hd + j] = fromFloat<T>(x0);
  kv.K[slot * hd + j + half] = fromFloat<T>(x1);
  if (j == 0) kv.k_pos[slot] = kv.positions[t];
}

// Value channel c (of kv_heads * head_dim) of new row t into the cache.
template <class T>
__device__ void appendValue(const KvAppend<T>& kv, int t, int c, float v) {
  const int hd = kv.head_dim, g = c / hd;
  if (kv.V) kv.V[newRow(kv, t, g, kv.kv_heads) * hd + c % hd] = fromFloat<T>(v);
}

template <class T, Epilogue E>
__global__ void __launch_bounds__(32 * kGemvWarps) gemvKernel(GemvArgs<T> a) {
  extern __shared__ uint4 smem[];  // x
  letNextStart();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This warp's row, which depends on the launch only. RopeAppend: blocks over the Q and K heads
  // take kGemvWarps / 2 RoPE pairs (j, j + head_dim / 2) of one head, a warp each row of a pair, so
  // the rotation happens here; the V blocks, kGemvWarps rows. SiluMul: the gate row and its up row.
  const KvAppend<T>& kv = a.kv;
  constexpr int kPairs = kGemvWarps / 2;
  const int hd = kv.head_dim, half = hd / 2, per_head = E == Epilogue::RopeAppend ? half / kPairs : 1;
  const int rope_blocks = (kv.q_heads + kv.kv_heads) * per_head, Q = kv.q_heads * hd, KV = kv.kv_heads * hd;
  const bool rope_block = E == Epilogue::RopeAppend && int(blockIdx.x) < rope_blocks;
  const int head = blockIdx.x / per_head, j0 = blockIdx.x % per_head * kPairs;
  const int c = (blockIdx.x - rope_blocks) * kGemvWarps + warp;  // RopeAppend's V channel
  int row = blockIdx.x * kGemvWarps + warp;
  bool live = row < a.out;
  if constexpr (E == Epilogue::RopeAppend) {
    row = rope_block ? head * hd + j0 + warp % kPairs + (warp < kPairs ? 0 : half) : Q + KV + c;
    live = rope_block || c < KV;
  }
  WeightRow<T, E == Epilogue::SiluMul ? 4 : 8> w, up;
  if (live) w.request(a.W + int64_t(row) * a.in_dim, a.in_dim);
  if constexpr (E == Epilogue::SiluMul)  // W = gate rows, then up rows
    if (live) up.request(a.W + int64_t(a.out + row) * a.in_dim, a.in_dim);
  waitForPrevious();
  for (int i = threadIdx.x; i < a.in_dim * int(sizeof(T)) / 16; i += blockDim.x)
    smem[i] = reinterpret_cast<const uint4*>(a.x)[i];
  float scale = 1.0f;  // a deferred RMSNorm's, from the emitting product's sums (in a fixed order)
  if (a.normed.sums) {
    float ss = 0.0f;
    for (int i = lane; i < gemvBlocks(a.in_dim); i += 32) ss += a.normed.sums[i];
    scale = rsqrtf(warpSum(ss) / a.in_dim + a.normed.eps);
  }
  __syncthreads();
  auto dot = [&](const auto& r, int at) { return r.dot(smem, a.in_dim) * scale + (a.bias ? a.bias[at] : 0.0f); };
  if constexpr (E == Epilogue::RopeAppend) {
    if (rope_block) {
      __shared__ float rows[kGemvWarps];
      const float s = dot(w, row);
      if (lane == 0) rows[warp] = s;
      __syncthreads();
      if (threadIdx.x < kPairs)
        ropeAppendPair(kv, 0, head, j0 + threadIdx.x, rows[threadIdx.x], rows[threadIdx.x + kPairs], a.y);
    } else {
      if (!live) return;
      const float s = dot(w, row);
      if (lane != 0) return;
      a.y[row] = s;
      appendValue(kv, 0, c, s);
    }
  } else if constexpr (E == Epilogue::Store) {
    float v = live ? dot(w, row) : 0.0f;
    if (live && lane == 0) a.y[row] = v = v + (a.accumulate ? a.y[row] : 0.0f);
    if (!a.emit.w) return;
    __shared__ float squares[kGemvWarps];
    if (lane == 0) {
      squares[warp] = v * v;
      if (live) a.emit.fed[row] = fromFloat<T>(v * a.emit.w[row]);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float ss = 0.0f;
      for (int i = 0; i < kGemvWarps; ++i) ss += squares[i];
      a.emit.sums[blockIdx.x] = ss;
    }
  } else {
    if (!live) return;
    float s = dot(w, row);
    if constexpr (E == Epilogue::SiluMul) {
      const float u = dot(up, a.out + row);
      s = s / (1.0f + expf(-s)) * u;
    } else {
      s = fmaxf(s, 0.0f);
    }
    if (lane == 0) a.act[row] = fromFloat<T>(s);
  }
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
__global__ void ropeAppendKernel(float* qkv, KvAppend<T> kv) {
  const int t = blockIdx.x, hd = kv.head_dim, half = hd / 2, Q = kv.q_heads * hd, KV = kv.kv_heads * hd;
  const int pairs = (kv.q_heads + kv.kv_heads) * half;
  float* row = qkv + int64_t(t) * (Q + 2 * KV);
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i < pairs) {
    const int head = i / half, j = i % half;  // K heads follow the Q heads
    ropeAppendPair(kv, t, head, j, row[head * hd + j], row[head * hd + j + half], row);
  } else if (i < pairs + KV) {
    appendValue(kv, t, i - pairs, row[Q + KV + i - pairs]);
  }
}

// rope[t][j] = (cos, sin) of positions[t] * inv_freq[j], the angle in double as on the CPU.
__global__ void ropeTableKernel(const int* positions, int half, const float* inv_freq, float2* rope) {
  const int t = blockIdx.x;
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    double s, c;
    sincos(double(positions[t]) * inv_freq[j], &s, &c);
    rope[int64_t(t) * half + j] = make_float2(float(c), float(s));
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

namespace {

// One row whose vectors can be read 16 bytes at a time goes through the GEMV kernels: its shape,
// then (gemvFits) its buffers' alignment.
template <class T>
bool gemvShapeFits(int rows, int in) {
  return rows == 1 && in % (16 / int(sizeof(T))) == 0;
}
template <class T>
bool gemvFits(const T* x, int rows, int in, const T* W) {
  return gemvShapeFits<T>(rows, in) && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(W)) % 16 == 0;
}
// The fused Q|K|V product rotates pairs of a head within a block.
bool qkvGemvFits(int head_dim) { return head_dim % kGemvWarps == 0; }

}  // namespace

template <class T, Epilogue E>
void launchGemv(const GemvArgs<T>& a, unsigned blocks) {
  const int smem = int(size_t(a.in_dim) * sizeof(T));
  // Past 40 KiB, ask for it: the kernel's static shared memory counts against the default 48 too.
  if (smem > 40 * 1024)
    KVTP_CUDA_CHECK(cudaFuncSetAttribute(gemvKernel<T, E>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  launchDependent(gemvKernel<T, E>, blocks, 32 * kGemvWarps, size_t(smem), a);
}

int deferredNormSums(int dim) { return gemvBlocks(dim); }

template <class T>
bool deferredNormFits(int rows, int hidden, int q_dim, int ffn, int head_dim) {
  return gemvShapeFits<T>(rows, hidden) && gemvShapeFits<T>(rows, q_dim) && gemvShapeFits<T>(rows, ffn) &&
         qkvGemvFits(head_dim);
}

// A product that takes part in a DeferredNorm goes through the GEMV kernels or not at all.
template <class T>
void requireGemv(bool fits, const DeferredNorm<T>* norm, const char* what) {
  if (norm && !fits) throw std::invalid_argument(std::string(what) + ": a deferred norm needs one row through the GEMV kernels");
}

template <class T>
void gemm(const Blas& blas, const T* x, int rows, int in, const T* W, int out, const float* bias, float* y,
          bool accumulate, const DeferredNorm<T>* emit) {
  const bool fits = gemvFits(x, rows, in, W);
  requireGemv(fits, emit, "cuda::gemm");
  if (!fits) return gemmBlas(blas, x, rows, in, W, out, bias, y, accumulate);
  GemvArgs<T> a{x, W, in, out, bias, y, accumulate, nullptr, {}};
  if (emit) a.emit = *emit;
  launchGemv<T, Epilogue::Store>(a, unsigned(gemvBlocks(out)));
}

template <class T>
void gemmActivation(const Blas& blas, const T* x, int rows, int in, const T* W, int F, const float* bias,
                    Activation act, float* scratch, T* out, const DeferredNorm<T>* normed) {
  const bool fits = gemvFits(x, rows, in, W);
  requireGemv(fits, normed, "cuda::gemmActivation");
  if (fits) {
    GemvArgs<T> a{x, W, in, F, bias, nullptr, false, out, {}};
    if (normed) a.normed = *normed;
    if (act == Activation::SiluMul) launchGemv<T, Epilogue::SiluMul>(a, unsigned(gemvBlocks(F)));
    else launchGemv<T, Epilogue::Relu>(a, unsigned(gemvBlocks(F)));
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
void qkvAppend(const Blas& blas, const T* x, int rows, int in, const T* W, const float* bias, float* qkv,
               const KvAppend<T>& kv, const DeferredNorm<T>* normed) {
  const int hd = kv.head_dim, out = (kv.q_heads + 2 * kv.kv_heads) * hd;
  const bool fits = gemvFits(x, rows, in, W) && qkvGemvFits(hd);
  requireGemv(fits, normed, "cuda::qkvAppend");
  if (fits) {
    GemvArgs<T> a{x, W, in, out, bias, qkv, false, nullptr, kv};
    if (normed) a.normed = *normed;
    launchGemv<T, Epilogue::RopeAppend>(a, unsigned(gemvBlocks(out)));
    return;
  }
  gemm(blas, x, rows, in, W, out, bias, qkv, false);
  ropeAppendKV(qkv, rows, kv);
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

// A decode step normalizes one row: 512 threads, each with a few float4 loads in flight.
constexpr int kNormThreads = 512;

template <class O>
void layerNormTo(const float* x, int rows, int dim, const float* w, const float* b, float eps, O* y) {
  launchDependent(normKernel<O>, rows, kNormThreads, 0, x, dim, w, b, eps, y);
}

template <class O>
void rmsNormTo(const float* x, int rows, int dim, const float* w, float eps, O* y) {
  launchDependent(normKernel<O>, rows, kNormThreads, 0, x, dim, w, static_cast<const float*>(nullptr), eps, y);
}

void ropeTable(const int* positions, int rows, int head_dim, const float* inv_freq, float2* rope) {
  if (rows == 0) return;
  ropeTableKernel<<<rows, 64>>>(positions, head_dim / 2, inv_freq, rope);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void ropeAppendKV(float* qkv, int rows, const KvAppend<T>& kv) {
  const int items = (kv.q_heads + kv.kv_heads) * kv.head_dim / 2 + kv.kv_heads * kv.head_dim;
  ropeAppendKernel<<<dim3(rows, (items + 127) / 128), 128>>>(qkv, kv);
  KVTP_CUDA_LAUNCHED();
}

// The probabilities of key l summed over KV head g's query heads, for the chunk's query rows from
// `from` on: with R == 1 all rows summed into observed[g][0][l]; else row t into
// observed[g][row0 + t - from][l] (observed: (kv_heads, R, L)). P: (heads, rows, Lk), each KV
// head's G heads consecutive.
template <class T>
__global__ void observeKernel(const T* P, int rows, int Lk, int G, int from, int64_t L, int R, int row0,
                              float* observed) {
  const int g = blockIdx.y, l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= Lk) return;
  float s = 0.0f;
  for (int t = from; t < rows; ++t) {
    for (int h = g * G; h < (g + 1) * G; ++h) s += toFloat(P[(int64_t(h) * rows + t) * Lk + l]);
    if (R > 1) observed[(int64_t(g) * R + row0 + t - from) * L + l] = s, s = 0.0f;
  }
  if (R == 1) observed[g * L + l] += s;
}

template <class T>
void attentionPrefill(const Blas& blas, const float* q, int64_t q_stride, const int* q_pos, const int* q_pos_host,
                      int rows, int heads, const T* K, const T* V, const int* k_pos, const int* k_pos_host, int L,
                      int kv_heads, int hd, int64_t capacity, float scale, T* out, size_t score_bytes,
                      float* observed, int observe_from, bool observe_rows) {
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
      const int from = std::max(0, observe_from - t0);
      observeKernel<<<dim3((Lk + 127) / 128, kv_heads), 128>>>(P, rc, Lk, G, from, L, observe_rows ? rows - observe_from : 1,
                                                               t0 + from - observe_from, observed);
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
  template void gemm<T>(const Blas&, const T*, int, int, const T*, int, const float*, float*, bool,                 \
                        const DeferredNorm<T>*);                                                                    \
  template bool deferredNormFits<T>(int, int, int, int, int);                                                       \
  template void gemmBlas<T>(const Blas&, const T*, int, int, const T*, int, const float*, float*, bool);            \
  template void gemmActivation<T>(const Blas&, const T*, int, int, const T*, int, const float*, Activation,         \
                                  float*, T*, const DeferredNorm<T>*);                                              \
  template void qkvAppend<T>(const Blas&, const T*, int, int, const T*, const float*, float*,                       \
                             const KvAppend<T>&, const DeferredNorm<T>*);                                           \
  template void convert<T>(const float*, int64_t, T*);                                                              \
  template void embed<T>(const int*, int, const T*, int, int, int, float*);                                         \
  template void layerNormTo<T>(const float*, int, int, const float*, const float*, float, T*);                      \
  template void rmsNormTo<T>(const float*, int, int, const float*, float, T*);                                      \
  template void ropeAppendKV<T>(float*, int, const KvAppend<T>&);                                                   \
  template void attentionPrefill<T>(const Blas&, const float*, int64_t, const int*, const int*, int, int, const T*, \
                                    const T*, const int*, const int*, int, int, int, int64_t, float, T*, size_t,    \
                                    float*, int, bool);
KVTP_FORWARD_OPS(float)
KVTP_FORWARD_OPS(__half)
KVTP_FORWARD_OPS(__nv_bfloat16)
#undef KVTP_FORWARD_OPS

}  // namespace kvtp::cuda
