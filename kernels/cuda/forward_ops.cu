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

// The cache row (head * capacity + slot) where new row t's KV head g lands (KvAppend, Int8Append).
template <class A>
__device__ int64_t newRow(const A& a, int t, int g, int kv_heads) {
  if (a.rows_are_sequences) {
    const int head = t * kv_heads + g;
    return head * a.capacity + a.first_slots[head];
  }
  return g * a.capacity + a.first_slots[g] + t;
}

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
  if (threadIdx.x == 0 && k_pos) sp[to] = k_pos[from];
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
  if (threadIdx.x == 0 && k_pos) k_pos[to] = sp[from];
}

// One warp per (new row t, KV head g, key or value): the row's step = max|x| / 127 and its codes
// round(x / step) in [-127, 127] (kv::fitInt8 / encodeInt8, round half to even as nearbyint),
// at slot first_slots[g] + t; the key's warp writes the position.
__global__ void quantizeAppendKernel(Int8Append a) {
  const int t = blockIdx.x, g = blockIdx.y, is_v = blockIdx.z, lane = threadIdx.x;
  const float* x = a.qkv + int64_t(t) * a.qkv_stride + (is_v ? a.v_offset : a.k_offset) + g * a.head_dim;
  float mx = 0.0f;
  for (int c = lane; c < a.head_dim; c += 32) mx = fmaxf(mx, fabsf(x[c]));
  const float step = warpMax(mx) / 127.0f;
  const int64_t slot = newRow(a, t, g, int(gridDim.y));
  int8_t* codes = (is_v ? a.V : a.K) + slot * a.head_dim;
  for (int c = lane; c < a.head_dim; c += 32)
    codes[c] = int8_t(step > 0.0f ? fminf(fmaxf(rintf(x[c] / step), -127.0f), 127.0f) : 0.0f);
  if (lane == 0) (is_v ? a.v_step : a.k_step)[slot] = step;
  if (lane == 0 && !is_v) a.k_pos[slot] = a.positions[t];
}

// Rows [0, count) of every KV head of an int8 cache back to full precision in T, with their
// positions, into a (kv_heads, stage_capacity) stage.
template <class T>
__global__ void dequantizeKernel(Int8Append a, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  const int l = blockIdx.x, g = blockIdx.y;
  if (l >= count) return;
  const int64_t from = g * a.capacity + l, to = g * stage_capacity + l;
  for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) {
    K[to * a.head_dim + c] = fromFloat<T>(float(a.K[from * a.head_dim + c]) * a.k_step[from]);
    V[to * a.head_dim + c] = fromFloat<T>(float(a.V[from * a.head_dim + c]) * a.v_step[from]);
  }
  if (threadIdx.x == 0) k_pos[to] = a.k_pos[from];
}

// One block per (new row t, KV head g, key or value): the row into the ring, the key's block
// writing the position.
template <class T>
__global__ void kiviAppendKernel(KiviCache<T> c, const float* qkv, int64_t qkv_stride, int64_t k_offset,
                                 int64_t v_offset, const int* first_slots, const int* positions,
                                 bool rows_are_sequences) {
  const int t = blockIdx.x, g = blockIdx.y, is_v = blockIdx.z;
  const int64_t head = rows_are_sequences ? int64_t(t) * gridDim.y + g : g;
  const int slot = first_slots[head] + (rows_are_sequences ? 0 : t);
  const float* x = qkv + int64_t(t) * qkv_stride + (is_v ? v_offset : k_offset) + int64_t(g) * c.head_dim;
  T* row = (is_v ? c.ring.v : c.ring.k) + c.ring.at(head, slot);
  for (int ch = threadIdx.x; ch < c.head_dim; ch += blockDim.x) row[ch] = fromFloat<T>(x[ch]);
  if (threadIdx.x == 0 && !is_v) c.k_pos[head * c.capacity + slot] = positions[t];
}

// kv::encodeAffine: round((x - lo) / step) into [0, 2^bits - 1], 0 when every value equals lo.
__device__ int encodeAffine(float x, float lo, float step, int bits) {
  if (step <= 0.0f) return 0;
  return int(fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, lo), step)), 0.0f), float((1 << bits) - 1)));
}

// One block per (run j, KV head h), a thread per channel: rows [first, first + group) with first =
// quantized[h] + j * group, if the run ends by quantized_after[h]; it becomes the head's run
// first / group (under eviction runs[h] + j, recorded per row). Keys: (lo, step) per channel over
// the run (kv::fitAffine), values: per row over groups of `group` channels; then each row's codes
// packed, a thread per byte.
template <class T>
__global__ void kiviQuantizeKernel(KiviCache<T> c, const T* stage_k, const T* stage_v, int64_t stage_capacity) {
  const int h = blockIdx.y, ch = threadIdx.x, hd = c.head_dim, G = c.group, bits = c.bits;
  const int first = c.quantized[h] + int(blockIdx.x) * G;
  if (first + G > c.quantized_after[h]) return;
  const int run = c.runs ? c.runs[h] + int(blockIdx.x) : first / G;
  const float levels = float((1 << bits) - 1);
  auto source = [&](bool value, int l) -> const T* {  // row l of head h: the stage's, else the ring's
    if (stage_k) return (value ? stage_v : stage_k) + (h * stage_capacity + l) * hd;
    return (value ? c.ring.v : c.ring.k) + c.ring.at(h, l);
  };
  float k_lo = 0.0f, k_step = 0.0f;
  if (ch < hd) {
    float lo = toFloat(source(false, first)[ch]), hi = lo;
    for (int l = first + 1; l < first + G; ++l) {
      const float x = toFloat(source(false, l)[ch]);
      lo = fminf(lo, x), hi = fmaxf(hi, x);
    }
    k_lo = lo, k_step = __fdiv_rn(__fsub_rn(hi, lo), levels);
    reinterpret_cast<float2*>(c.k_params)[(int64_t(h) * c.keyGroups() + run) * hd + ch] = {k_lo, k_step};
  }
  if (c.run)
    for (int i = ch; i < G; i += blockDim.x) c.run[int64_t(h) * c.capacity + first + i] = run;
  __shared__ float value[256];
  __shared__ float2 v_affine[256];
  __shared__ uint8_t k_code[256], v_code[256];
  const int VG = c.valueGroups(), cb = c.codeBytes();
  for (int l = first; l < first + G; ++l) {
    const int64_t row = int64_t(h) * c.capacity + l;
    if (ch < hd) {
      k_code[ch] = uint8_t(encodeAffine(toFloat(source(false, l)[ch]), k_lo, k_step, bits));
      value[ch] = toFloat(source(true, l)[ch]);
    }
    __syncthreads();
    if (ch < VG) {  // value group ch: channels [ch G, min(ch G + G, hd))
      const int from = ch * G, to = min(from + G, hd);
      float lo = value[from], hi = lo;
      for (int i = from + 1; i < to; ++i) lo = fminf(lo, value[i]), hi = fmaxf(hi, value[i]);
      v_affine[ch] = {lo, __fdiv_rn(__fsub_rn(hi, lo), levels)};
      reinterpret_cast<float2*>(c.v_params)[row * VG + ch] = v_affine[ch];
    }
    __syncthreads();
    if (ch < hd) {
      const float2 a = v_affine[ch / G];
      v_code[ch] = uint8_t(encodeAffine(value[ch], a.x, a.y, bits));
    }
    __syncthreads();
    if (ch < cb) {  // byte ch holds channels ch * 8 / bits .. (ch + 1) * 8 / bits - 1, low bits first
      uint8_t kb = 0, vb = 0;
      for (int i = ch * 8 / bits; i < min((ch + 1) * 8 / bits, hd); ++i) {
        kb |= uint8_t(k_code[i] << (i * bits % 8));
        vb |= uint8_t(v_code[i] << (i * bits % 8));
      }
      c.K[row * cb + ch] = kb, c.V[row * cb + ch] = vb;
    }
    __syncthreads();
  }
}

// After a stage's step: each head's rows [quantized_after, length) into the ring, and the
// positions of rows first_new.. into k_pos (grid-stride over rows).
template <class T>
__global__ void kiviKeepKernel(KiviCache<T> c, const T* stage_k, const T* stage_v, const int* stage_pos,
                               int64_t stage_capacity, const int* lengths, int first_new) {
  const int h = blockIdx.y, hd = c.head_dim, keep_from = c.quantized_after[h];
  for (int l = min(keep_from, first_new) + blockIdx.x; l < lengths[h]; l += gridDim.x) {
    const int64_t from = h * stage_capacity + l;
    if (l >= keep_from) c.ring.put(h, l, stage_k + from * hd, stage_v + from * hd);
    if (l >= first_new && threadIdx.x == 0) c.k_pos[int64_t(h) * c.capacity + l] = stage_pos[from];
  }
}

template <class T>
__global__ void kiviRowsKernel(KiviCache<T> c, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  const int l = blockIdx.x, h = blockIdx.y, hd = c.head_dim;
  if (l >= count) return;
  const int64_t to = h * stage_capacity + l, row = int64_t(h) * c.capacity + l;
  const bool coded = l < c.quantized[h];
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    if (coded) {
      K[to * hd + ch] = fromFloat<T>(KiviCache<T>::decode(c.keyParams(h, l, ch), c.code(c.K + row * c.codeBytes(), ch)));
      V[to * hd + ch] = fromFloat<T>(KiviCache<T>::decode(c.valueParams(h, l, ch), c.code(c.V + row * c.codeBytes(), ch)));
    } else {
      const int64_t ring_row = c.ring.at(h, l);
      K[to * hd + ch] = c.ring.k[ring_row + ch], V[to * hd + ch] = c.ring.v[ring_row + ch];
    }
  }
  if (threadIdx.x == 0) k_pos[to] = c.k_pos[row];
}

template <class T>
void kiviAppend(const KiviCache<T>& c, int rows, int kv_heads, const float* qkv, int64_t qkv_stride, int64_t k_offset,
                int64_t v_offset, const int* first_slots, const int* positions, bool rows_are_sequences) {
  if (rows == 0) return;
  kiviAppendKernel<<<dim3(rows, kv_heads, 2), std::min(c.head_dim, 128)>>>(c, qkv, qkv_stride, k_offset, v_offset,
                                                                           first_slots, positions, rows_are_sequences);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void kiviSettle(const KiviCache<T>& c, int kv_heads, int max_runs, const T* stage_k, const T* stage_v,
                const int* stage_pos, int64_t stage_capacity, const int* lengths, int first_new) {
  if (c.head_dim > 256) throw std::runtime_error("kiviSettle: head_dim above 256");
  if (max_runs > 0) {
    kiviQuantizeKernel<<<dim3(max_runs, kv_heads), std::max(32, c.head_dim)>>>(c, stage_k, stage_v, stage_capacity);
    KVTP_CUDA_LAUNCHED();
  }
  if (stage_k) {
    kiviKeepKernel<<<dim3(64, kv_heads), std::min(c.head_dim, 128)>>>(c, stage_k, stage_v, stage_pos, stage_capacity,
                                                                     lengths, first_new);
    KVTP_CUDA_LAUNCHED();
  }
}

template <class T>
void kiviRows(const KiviCache<T>& c, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  if (count == 0) return;
  kiviRowsKernel<<<dim3(count, kv_heads), std::min(c.head_dim, 128)>>>(c, count, K, V, k_pos, stage_capacity);
  KVTP_CUDA_LAUNCHED();
}

// kernels::applyRope on the channel pair (a, b) = (x[i], x[i + half]) at position p. The CPU takes
// cos and sin of the angle in double; here the angle is formed and reduced to [-pi, pi] in double
// (float angles lose the low bits past a few thousand positions), then its sine and cosine come
// from the special function units (absolute error ~4e-7 there, below fp16's rounding; the stage
// rotates every row of every step, where a double sincos cost 2.5x the row's memory time).
__device__ float2 ropePair(float a, float b, int p, float inv_freq) {
  constexpr double kTwoPi = 6.283185307179586476925, kInvTwoPi = 0.15915494309189533577;
  const double angle = double(p) * inv_freq;
  float sn, cs;
  __sincosf(float(fma(-kTwoPi, rint(angle * kInvTwoPi), angle)), &sn, &cs);
  return {a * cs - b * sn, b * cs + a * sn};
}

// Low rank's window held as int8 (LowRankCache::int8): a ring row's head_dim codes, then their step.
template <class T>
__device__ float windowChannel(const LowRankCache<T>& c, const T* row, int ch) {
  if (!c.int8) return toFloat(row[ch]);
  const int8_t* codes = reinterpret_cast<const int8_t*>(row);
  return __fmul_rn(float(codes[ch]), *reinterpret_cast<const float*>(codes + c.head_dim));
}

// x (head_dim floats, shared) through int8 and back as kv::fitInt8 / encodeInt8 and the decode
// (the step max|x| / 127, codes rounded half to even); into `codes` and `step` too when given.
// Every thread of the block calls it.
__device__ void int8RoundTrip(float* x, int head_dim, int8_t* codes = nullptr, float* step_out = nullptr) {
  float mx = 0.0f;
  for (int ch = threadIdx.x; ch < head_dim; ch += blockDim.x) mx = fmaxf(mx, fabsf(x[ch]));
  const float step = blockReduce(mx, warpMax, 0.0f) / 127.0f;
  for (int ch = threadIdx.x; ch < head_dim; ch += blockDim.x) {
    const float code = step > 0.0f ? fminf(fmaxf(rintf(x[ch] / step), -127.0f), 127.0f) : 0.0f;
    if (codes) codes[ch] = int8_t(code);
    x[ch] = __fmul_rn(code, step);
  }
  if (step_out && threadIdx.x == 0) *step_out = step;
  __syncthreads();
}

// The stage after lowRankRows' products: rows below `projected` rotated to their positions
// (kv::KVCache::rows), rows up to counts[h] copied from the ring. A thread per channel pair
// (i, i + half) of a row, the block's threads over consecutive rows, grid-stride over rows.
template <class T>
__global__ void lowRankFinishKernel(LowRankCache<T> c, const int* counts, T* K, T* V) {
  const int h = blockIdx.y, hd = c.head_dim, half = hd / 2, projected = c.projected[h];
  const int per_block = blockDim.x / half, i = threadIdx.x % half;
  if (threadIdx.x >= per_block * half) return;
  for (int l = blockIdx.x * per_block + threadIdx.x / half; l < counts[h]; l += gridDim.x * per_block) {
    const int64_t row = (int64_t(h) * c.capacity + l) * hd;
    T* k = K + row;
    if (l < projected) {
      if (!c.inv_freq) continue;
      const float2 x = ropePair(toFloat(k[i]), toFloat(k[i + half]), c.k_pos[int64_t(h) * c.capacity + l], c.inv_freq[i]);
      k[i] = fromFloat<T>(x.x), k[i + half] = fromFloat<T>(x.y);
    } else {
      const int64_t from = c.ring.at(h, l);
      for (int ch : {i, i + half})
        k[ch] = fromFloat<T>(windowChannel(c, c.ring.k + from, ch)),
        V[row + ch] = fromFloat<T>(windowChannel(c, c.ring.v + from, ch));
    }
  }
}

// Rows [projected, projected_after) of each head (blockIdx.y) from the stage (null: from the ring)
// to coordinates: the key taken out of its rotation (RoPE at -position), then z = B^T x for key
// and value, a thread per coordinate; then the rows the ring keeps. Grid-stride over rows.
template <class T>
__global__ void lowRankSettleKernel(LowRankCache<T> c, const T* K, const T* V, const int* first_new,
                                    const int* lengths) {
  extern __shared__ float kv_row[];  // the row's key then value, float
  const int h = blockIdx.y, hd = c.head_dim, half = hd / 2, r = c.rank;
  const int64_t basis = int64_t(h % c.kv_heads) * hd * r;
  for (int l = c.projected[h] + blockIdx.x; l < c.projected_after[h]; l += gridDim.x) {
    const int64_t row = int64_t(h) * c.capacity + l;
    if (K) {
      for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
        kv_row[ch] = toFloat(K[row * hd + ch]), kv_row[hd + ch] = toFloat(V[row * hd + ch]);
      __syncthreads();
      if (c.int8 && l >= first_new[h]) int8RoundTrip(kv_row, hd), int8RoundTrip(kv_row + hd, hd);
    } else {
      const int64_t at = c.ring.at(h, l);
      for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
        kv_row[ch] = windowChannel(c, c.ring.k + at, ch), kv_row[hd + ch] = windowChannel(c, c.ring.v + at, ch);
      __syncthreads();
    }
    if (c.inv_freq)
      for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 x = ropePair(kv_row[i], kv_row[i + half], -c.k_pos[row], c.inv_freq[i]);
        kv_row[i] = x.x, kv_row[i + half] = x.y;
      }
    __syncthreads();
    for (int j = threadIdx.x; j < 2 * r; j += blockDim.x) {  // kv::coordinates
      const bool value = j >= r;
      const T* B = (value ? c.value_basis : c.key_basis) + basis + (value ? j - r : j);
      const float* x = kv_row + (value ? hd : 0);
      double z = 0;
      for (int i = 0; i < hd; ++i) z += double(toFloat(B[int64_t(i) * r])) * x[i];
      c.coords[row * 2 * r + j] = fromFloat<T>(float(z));
    }
    __syncthreads();
  }
  for (int l = max(c.projected_after[h], first_new[h]) + blockIdx.x; l < lengths[h]; l += gridDim.x) {
    const int64_t from = (int64_t(h) * c.capacity + l) * hd;
    if (!c.int8) {
      c.ring.put(h, l, K + from, V + from);
      continue;
    }
    for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
      kv_row[ch] = toFloat(K[from + ch]), kv_row[hd + ch] = toFloat(V[from + ch]);
    __syncthreads();
    for (T* ring : {c.ring.k, c.ring.v}) {
      int8_t* codes = reinterpret_cast<int8_t*>(ring + c.ring.at(h, l));
      int8RoundTrip(kv_row + (ring == c.ring.v ? hd : 0), hd, codes, reinterpret_cast<float*>(codes + hd));
    }
  }
}

template <class T>
void lowRankRows(const Blas& blas, const LowRankCache<T>& c, int heads, int rows, const int* counts, T* K, T* V) {
  if (rows == 0 || heads == 0) return;
  const float one = 1.0f, zero = 0.0f;
  const int hd = c.head_dim, r = c.rank;
  // Per sequence (a batch's heads reuse the layer's bases): stage (rows, hd) = Z (rows, r) B^T,
  // Z a row's key or value coordinates, B (hd, r) — column-major, C^T = B Z^T.
  for (int first = 0; first < heads; first += c.kv_heads)
    for (int value = 0; value < 2; ++value) {
      const T* B = value ? c.value_basis : c.key_basis;
      const T* Z = c.coords + int64_t(first) * c.capacity * 2 * r + (value ? r : 0);
      T* out = (value ? V : K) + int64_t(first) * c.capacity * hd;
      KVTP_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, hd, rows, r, &one, B, dataType<T>(), r, int64_t(hd) * r, Z,
          dataType<T>(), 2 * r, c.capacity * 2 * r, &zero, out, dataType<T>(), hd, c.capacity * hd,
          std::min(c.kv_heads, heads - first), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  const int threads = std::max(128, hd / 2), per_block = threads / (hd / 2);
  lowRankFinishKernel<<<dim3(std::min((rows + per_block - 1) / per_block, 2048), heads), threads>>>(c, counts, K, V);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void lowRankSettle(const LowRankCache<T>& c, int heads, int max_rows, const T* K, const T* V, const int* first_new,
                   const int* lengths) {
  if (heads == 0) return;
  lowRankSettleKernel<<<dim3(std::clamp(max_rows, 1, 512), heads), 128, 2 * c.head_dim * sizeof(float)>>>(
      c, K, V, first_new, lengths);
  KVTP_CUDA_LAUNCHED();
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

void quantizeAppend(int rows, int kv_heads, const Int8Append& a) {
  if (rows == 0) return;
  quantizeAppendKernel<<<dim3(rows, kv_heads, 2), 32>>>(a);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void dequantizeRows(const Int8Append& a, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  if (count == 0) return;
  dequantizeKernel<<<dim3(count, kv_heads), std::min(a.head_dim, 128)>>>(a, count, K, V, k_pos, stage_capacity);
  KVTP_CUDA_LAUNCHED();
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
  template void compactKV<T>(T*, T*, int*, int64_t, int, int, const int*, const int*, int);                         \
  template void dequantizeRows<T>(const Int8Append&, int, int, T*, T*, int*, int64_t);                              \
  template void kiviAppend<T>(const KiviCache<T>&, int, int, const float*, int64_t, int64_t, int64_t, const int*,   \
                              const int*, bool);                                                                    \
  template void kiviSettle<T>(const KiviCache<T>&, int, int, const T*, const T*, const int*, int64_t, const int*,   \
                              int);                                                                                 \
  template void kiviRows<T>(const KiviCache<T>&, int, int, T*, T*, int*, int64_t);                                  \
  template void lowRankRows<T>(const Blas&, const LowRankCache<T>&, int, int, const int*, T*, T*);                  \
  template void lowRankSettle<T>(const LowRankCache<T>&, int, int, const T*, const T*, const int*, const int*);     \
  template void attentionPrefill<T>(const Blas&, const float*, int64_t, const int*, const int*, int, int, const T*, \
                                    const T*, const int*, const int*, int, int, int, int64_t, float, T*, size_t,    \
                                    float*, int, bool);
KVTP_FORWARD_OPS(float)
KVTP_FORWARD_OPS(__half)
KVTP_FORWARD_OPS(__nv_bfloat16)
#undef KVTP_FORWARD_OPS
template void compactKV<int8_t>(int8_t*, int8_t*, int*, int64_t, int, int, const int*, const int*, int);

}  // namespace kvtp::cuda
