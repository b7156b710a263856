// What the CUDA kernel tests share: fresh random inputs, outputs poisoned with NaN so an unwritten
// element fails, the relative error they are held to, fp16 / bf16 buffers from floats and back.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_util.h"

#define REQUIRE_GPU()                                                                     \
  if (kvtp::cuda::deviceCount() == 0) GTEST_SKIP() << "no CUDA device here: this test runs on the GPU machine"

namespace kvtp::cuda_test {

using cuda::DeviceBuffer;

inline std::vector<float> randn(size_t n, float sd = 1.0f) {
  static std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<float> poisoned(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

// ||a - b|| / ||b||, NaN anywhere fails.
inline double relError(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Float32 everywhere: differences are summation order, far under 1e-5 relative.
constexpr double kTol = 1e-5;

inline std::vector<float> roundedTo(std::vector<float> v, bool bf16) {
  for (auto& x : v) x = bf16 ? cuda::toFloat(cuda::fromFloat<__nv_bfloat16>(x)) : cuda::toFloat(cuda::fromFloat<__half>(x));
  return v;
}
template <class T>
DeviceBuffer<T> deviceAs(const std::vector<float>& v) {
  std::vector<T> t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = cuda::fromFloat<T>(v[i]);
  return DeviceBuffer<T>(t);
}
template <class T>
std::vector<float> floatsOf(const DeviceBuffer<T>& d) {
  std::vector<float> v;
  for (const T& x : d.download()) v.push_back(cuda::toFloat(x));
  return v;
}

}  // namespace kvtp::cuda_test
