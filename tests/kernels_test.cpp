// The CPU kernels against plain float64 loops on fresh random inputs. (The CUDA kernels will be
// checked against these same CPU twins.)
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/cpu_ops.h"

namespace kvtp::kernels {
namespace {

std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(Kernels, LinearMatchesLoopsWithBiasAndAccumulate) {
  const int T = 5, in = 7, out = 3;
  auto x = randn(T * in, 1), W = randn(out * in, 2), b = randn(out, 3), y = randn(T * out, 4);
  auto y0 = y;
  linear(x.data(), T, in, W.data(), out, b.data(), y.data(), true);
  for (int t = 0; t < T; ++t)
    for (int o = 0; o < out; ++o) {
      double r = y0[t * out + o] + b[o];
      for (int i = 0; i < in; ++i) r += double(x[t * in + i]) * W[o * in + i];
      EXPECT_NEAR(y[t * out + o], r, 1e-5);
    }
}

TEST(Kernels, AttentionIsCausalByPosition) {
  const int T = 3, L = 5, hd = 4;
  auto q = randn(T * hd, 5), K = randn(L * hd, 6), V = randn(L * hd, 7);
  const int q_pos[T] = {2, 3, 4};
  const int k_pos[L] = {0, 1, 2, 3, 4};
  std::vector<float> out(T * hd), probs(T * L);
  attendHead(q.data(), hd, q_pos, T, K.data(), V.data(), k_pos, L, hd, 0.5f, out.data(), hd, probs.data());
  for (int t = 0; t < T; ++t) {
    std::vector<double> s(L);
    double mx = -1e300, sum = 0;
    for (int l = 0; l <= q_pos[t]; ++l) {
      s[l] = 0;
      for (int i = 0; i < hd; ++i) s[l] += 0.5 * q[t * hd + i] * K[l * hd + i];
      mx = std::max(mx, s[l]);
    }
    for (int l = 0; l <= q_pos[t]; ++l) sum += std::exp(s[l] - mx);
    for (int l = 0; l < L; ++l) {
      const double p = l <= q_pos[t] ? std::exp(s[l] - mx) / sum : 0.0;
      EXPECT_NEAR(probs[t * L + l], p, 1e-6);
    }
    for (int i = 0; i < hd; ++i) {
      double o = 0;
      for (int l = 0; l <= q_pos[t]; ++l) o += std::exp(s[l] - mx) / sum * V[l * hd + i];
      EXPECT_NEAR(out[t * hd + i], o, 1e-5);
    }
  }
}

TEST(Kernels, SoftmaxPartialsCombineToTheFullLogSoftmax) {
  const int V = 50;
  auto logits = randn(V, 8);
  for (auto& l : logits) l *= 4;
  const int target = 37;
  SoftmaxPartial full;
  softmaxPartials(logits.data(), 1, V, 0, &target, &full);
  SoftmaxPartial a, b;  // two vocabulary shards, as under tensor parallelism
  softmaxPartials(logits.data(), 1, 20, 0, &target, &a);
  softmaxPartials(logits.data() + 20, 1, 30, 20, &target, &b);
  EXPECT_FALSE(a.has_target);
  a.combine(b);
  double mx = -1e300, sum = 0;
  for (float l : logits) mx = std::max(mx, double(l));
  for (float l : logits) sum += std::exp(l - mx);
  const double want = logits[target] - mx - std::log(sum);
  EXPECT_NEAR(full.logprob(), want, 1e-9);
  EXPECT_NEAR(a.logprob(), want, 1e-9);
}

TEST(Kernels, RopeRotatesHalvesByPositionAngle) {
  const int hd = 4;
  std::vector<float> x = {1, 2, 3, 4};
  const float inv[2] = {1.0f, 0.1f};
  const int pos = 3;
  applyRope(x.data(), 1, 1, hd, &pos, inv);
  EXPECT_NEAR(x[0], 1 * std::cos(3.0) - 3 * std::sin(3.0), 1e-6);
  EXPECT_NEAR(x[2], 3 * std::cos(3.0) + 1 * std::sin(3.0), 1e-6);
  EXPECT_NEAR(x[1], 2 * std::cos(0.3) - 4 * std::sin(0.3), 1e-6);
  EXPECT_NEAR(x[3], 4 * std::cos(0.3) + 2 * std::sin(0.3), 1e-6);
}

TEST(Kernels, NormsMatchDefinitions) {
  const int dim = 16;
  auto x = randn(dim, 9), w = randn(dim, 10), b = randn(dim, 11);
  std::vector<float> y(dim), z(dim);
  layerNorm(x.data(), 1, dim, w.data(), b.data(), 1e-5f, y.data());
  rmsNorm(x.data(), 1, dim, w.data(), 1e-6f, z.data());
  double mean = 0, var = 0, ss = 0;
  for (float v : x) mean += v / dim;
  for (float v : x) var += (v - mean) * (v - mean) / dim, ss += double(v) * v / dim;
  for (int i = 0; i < dim; ++i) {
    EXPECT_NEAR(y[i], (x[i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i], 1e-5);
    EXPECT_NEAR(z[i], x[i] / std::sqrt(ss + 1e-6) * w[i], 1e-5);
  }
}

}  // namespace
}  // namespace kvtp::kernels
