// Device helpers shared by the .cu files of kernels/cuda/: warp and block reductions, the bias
// fill of a GEMM's output, and the row norms (float rows in, float or narrower out).
#pragma once
#include <cstdint>

#include "kernels/cuda/cuda_util.h"

namespace kvtp::cuda {
namespace {

constexpr int kThreads = 256;

// Programmatic dependent launch (sm_90): a kernel started by launchDependent may begin while the
// kernel before it in the stream is still running, so it can request what never changes (the
// weights) early; it must call waitForPrevious() before it touches anything an earlier kernel
// writes or reads, in every block. letNextStart() lets the next such kernel be scheduled once every
// block of this one has started (its wait still waits for this kernel to finish and its writes
// to land). Both are no-ops on older GPUs and in kernels launched the ordinary way.
__device__ inline void waitForPrevious() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ inline void letNextStart() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Bytes (4, 8 or 16) global -> shared without passing through registers (cp.async); zeros when
// !in (src must still be a valid address). A thread's copies land once it waits for their group
// (commitCopies, waitCopies): it may read its own at once, the others' after a barrier.
template <int Bytes>
__device__ void copyAsync(void* dst, const void* src, bool in) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16)  // (.cg: past L1, as a tile read once is)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(in ? 16 : 0) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(Bytes), "r"(in ? Bytes : 0)
                 : "memory");
}
__device__ inline void commitCopies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ void waitCopies() {  // until at most N groups are in flight
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <class... Params, class... Args>
void launchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = cudaStreamPerThread;
  config.attrs = &early;
  config.numAttrs = 1;
  KVTP_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, Params(args)...));
}
inline unsigned blocksFor(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

__device__ inline float warpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline double warpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warpMax(float v) {
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

// y (rows, out) = b broadcast over rows (+ y if add): a bias folded into a GEMM with beta = 1.
__global__ void fillRows(float* y, const float* b, int rows, int out, bool add) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * out) return;
  y[i] = add ? y[i] + b[i % out] : b[i % out];
}

// Block-wide sum of f(r[i]) over a float row, each thread taking 4 consecutive elements at a time
// (one 16-byte load, several in flight: a loop of dependent scalar loads made a one-row norm
// slower than the product it feeds). The order is fixed by blockDim, so every norm agrees.
template <class F>
__device__ float rowSum(const float* r, int dim, F f) {
  float s = 0.0f;
  if (dim % 4 == 0 && reinterpret_cast<uintptr_t>(r) % 16 == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(r);
#pragma unroll 4
    for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      const float4 v = r4[i];
      s += f(v.x) + f(v.y) + f(v.z) + f(v.w);
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += f(r[i]);
  }
  return blockReduce(s, warpSum, 0.0f);
}

// The statistics of a LayerNorm (b set) or RMSNorm row and the normalized element i.
struct RowNorm {
  const float *w, *b;
  float mean = 0.0f, inv = 0.0f;
  __device__ RowNorm(const float* r, int dim, const float* w_, const float* b_, float eps) : w(w_), b(b_) {
    if (b) mean = rowSum(r, dim, [](float v) { return v; }) / dim;
    const float m = mean;
    inv = rsqrtf(rowSum(r, dim, [m](float v) { return (v - m) * (v - m); }) / dim + eps);
  }
  __device__ float operator()(const float* r, int i) const {
    return b ? (r[i] - mean) * inv * w[i] + b[i] : w[i] * (r[i] * inv);
  }
};

// One block per row; y may be x (in place). b null: RMSNorm.
template <class O>
__global__ void normKernel(const float* x, int dim, const float* w, const float* b, float eps, O* y) {
  letNextStart();
  waitForPrevious();
  const float* r = x + int64_t(blockIdx.x) * dim;
  O* o = y + int64_t(blockIdx.x) * dim;
  const RowNorm norm(r, dim, w, b, eps);
#pragma unroll 4
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = fromFloat<O>(norm(r, i));
}

}  // namespace
}  // namespace kvtp::cuda
