// Device helpers shared by the .cu files of kernels/cuda/: warp and block reductions, the bias
// fill of a GEMM's output, and the row norms (float rows in, float or narrower out).
#pragma once
#include <cstdint>

#include "kernels/cuda/cuda_util.h"

namespace kvtp::cuda {
namespace {

constexpr int kThreads = 256;
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

// One block per row; y may be x (in place).
template <class O>
__global__ void layerNormKernel(const float* x, int dim, const float* w, const float* b, float eps, O* y) {
  const float* r = x + int64_t(blockIdx.x) * dim;
  O* o = y + int64_t(blockIdx.x) * dim;
  float s = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += r[i];
  const float mean = blockReduce(s, warpSum, 0.0f) / dim;
  float v = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) v += (r[i] - mean) * (r[i] - mean);
  const float inv = rsqrtf(blockReduce(v, warpSum, 0.0f) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = fromFloat<O>((r[i] - mean) * inv * w[i] + b[i]);
}

template <class O>
__global__ void rmsNormKernel(const float* x, int dim, const float* w, float eps, O* y) {
  const float* r = x + int64_t(blockIdx.x) * dim;
  O* o = y + int64_t(blockIdx.x) * dim;
  float s = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += r[i] * r[i];
  const float inv = rsqrtf(blockReduce(s, warpSum, 0.0f) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = fromFloat<O>(w[i] * (r[i] * inv));
}

}  // namespace
}  // namespace kvtp::cuda
