// Every CUDA kernel against its CPU twin on fresh random inputs, outputs poisoned with NaN first
// so an unwritten element fails. Runs on the GPU machine; elsewhere each test says it skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "kernels/cpu_ops.h"
#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/eviction.h"
#include "kernels/cuda/forward_ops.h"
#include "kv/budget_select.h"
#include "kv/kv_cache.h"
#include "kv/scorers.h"

namespace kvtp {
namespace {

using cuda::DeviceBuffer;

#define REQUIRE_GPU()                                                                     \
  if (cuda::deviceCount() == 0) GTEST_SKIP() << "no CUDA device here: this test runs on the GPU machine"

std::vector<float> randn(size_t n, float sd = 1.0f) {
  static std::mt19937 rng(std::random_device{}());  // fresh inputs every run
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<float> poisoned(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

// ||a - b|| / ||b||, NaN anywhere fails.
double relError(const std::vector<float>& a, const std::vector<float>& b) {
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

TEST(CudaKernels, LinearMatchesCpuWithBiasAndAccumulate) {
  REQUIRE_GPU();
  cuda::Blas blas;
  const int T = 37, in = 96, out = 80;
  auto x = randn(T * in), W = randn(out * in), b = randn(out), y0 = randn(T * out);
  for (bool acc : {false, true}) {
    auto want = y0;
    kernels::linear(x.data(), T, in, W.data(), out, b.data(), want.data(), acc);
    DeviceBuffer<float> dx(x), dW(W), db(b), dy(acc ? y0 : poisoned(y0.size()));
    cuda::linear(blas, dx.get(), T, in, dW.get(), out, db.get(), dy.get(), acc);
    EXPECT_LE(relError(dy.download(), want), kTol) << "accumulate " << acc;
  }
}

TEST(CudaKernels, NormsMatchCpu) {
  REQUIRE_GPU();
  const int T = 5, dim = 1000;
  auto x = randn(T * dim, 3.0f), w = randn(dim), b = randn(dim);
  std::vector<float> ln(T * dim), rms(T * dim);
  kernels::layerNorm(x.data(), T, dim, w.data(), b.data(), 1e-5f, ln.data());
  kernels::rmsNorm(x.data(), T, dim, w.data(), 1e-6f, rms.data());
  DeviceBuffer<float> dx(x), dw(w), db(b), dln(poisoned(ln.size())), drms(poisoned(rms.size()));
  cuda::layerNorm(dx.get(), T, dim, dw.get(), db.get(), 1e-5f, dln.get());
  cuda::rmsNorm(dx.get(), T, dim, dw.get(), 1e-6f, drms.get());
  EXPECT_LE(relError(dln.download(), ln), kTol);
  EXPECT_LE(relError(drms.download(), rms), kTol);
}

TEST(CudaKernels, ElementwiseMatchCpu) {
  REQUIRE_GPU();
  const int n = 10007;
  auto g = randn(n), u = randn(n), a = randn(n);
  auto g_cpu = g, a_cpu = a, r_cpu = g;
  kernels::siluMul(g_cpu.data(), u.data(), n);
  kernels::addInPlace(a_cpu.data(), u.data(), n);
  kernels::relu(r_cpu.data(), n);
  DeviceBuffer<float> dg(g), du(u), da(a), dr(g);
  cuda::siluMul(dg.get(), du.get(), n);
  cuda::addInPlace(da.get(), du.get(), n);
  cuda::relu(dr.get(), n);
  EXPECT_LE(relError(dg.download(), g_cpu), kTol);
  EXPECT_LE(relError(da.download(), a_cpu), kTol);
  EXPECT_EQ(dr.download(), r_cpu);
}

TEST(CudaKernels, RopeMatchesCpuAtLargePositions) {
  REQUIRE_GPU();
  const int T = 7, heads = 3, hd = 64;
  auto x = randn(T * heads * hd), inv = randn(hd / 2, 0.3f);
  for (auto& f : inv) f = std::abs(f);
  std::vector<int> pos = {0, 1, 17, 1000, 8191, 65536, 131071};
  auto want = x;
  kernels::applyRope(want.data(), T, heads, hd, pos.data(), inv.data());
  DeviceBuffer<float> dx(x), dinv(inv);
  DeviceBuffer<int> dpos(pos);
  cuda::applyRope(dx.get(), T, heads, hd, dpos.get(), dinv.get());
  EXPECT_LE(relError(dx.download(), want), kTol);
}

// GQA (1, 4 and 8 query heads per KV head, and groups of 3 and 6 that split into blocks), a cache with holes (evicted positions), queries at several
// positions (the first sees one key, none is hidden in a whole split), short and long caches.
TEST(CudaKernels, AttentionMatchesCpuOverAnEvictedCache) {
  REQUIRE_GPU();
  for (int hd : {16, 64})  // narrower than a warp, and a multiple of it
  for (int L : {1, 300, 20000})
  for (auto [heads, kv_heads] : {std::pair{8, 8}, {8, 2}, {8, 1}, {6, 2}, {12, 2}}) {
    const int T = 5;
    const float scale = 1.0f / std::sqrt(float(hd));
    std::vector<int> k_pos(L);
    for (int i = 0; i < L; ++i) k_pos[i] = i * 2 + (i % 3 == 0);  // ascending, with gaps
    std::vector<int> q_pos = {0, 3, L / 2, L + 7, 2 * L + 5};  // ascending k_pos are 0, 2 or 3, ...
    auto q = randn(T * heads * hd), K = randn(size_t(kv_heads) * L * hd), V = randn(size_t(kv_heads) * L * hd);
    std::vector<float> want(T * heads * hd);
    for (int h = 0; h < heads; ++h) {
      const int kvh = h / (heads / kv_heads);
      kernels::attendHead(q.data() + h * hd, heads * hd, q_pos.data(), T, K.data() + size_t(kvh) * L * hd,
                          V.data() + size_t(kvh) * L * hd, k_pos.data(), L, hd, scale, want.data() + h * hd, heads * hd);
    }
    DeviceBuffer<float> dq(q), dK(K), dV(V), dout(poisoned(want.size()));
    DeviceBuffer<int> dqp(q_pos), dkp(k_pos);
    cuda::attention(dq.get(), heads * hd, dqp.get(), T, heads, dK.get(), dV.get(), dkp.get(), L, kv_heads, hd,
                    int64_t(L) * hd, scale, dout.get());
    EXPECT_LE(relError(dout.download(), want), 1e-4) << "hd " << hd << " L " << L << " heads " << heads << " kv_heads " << kv_heads;
  }
}

// The CPU's causal attention of `rows` queries (rows of stride `stride`) over a cache laid out
// [kv_head][capacity][head_dim] holding L entries per head, and SnapKV's observation: the
// probabilities of the queries from row observe_from on, summed per KV head over its query heads
// (observed: the rows summed too; observed_rows: (kv_heads, rows - observe_from, L), a row each).
struct PrefillOnCpu {
  std::vector<float> out, observed, observed_rows;
};
PrefillOnCpu prefillOnCpu(const std::vector<float>& q, int stride, const std::vector<int>& q_pos,
                          const std::vector<float>& K, const std::vector<float>& V, const std::vector<int>& k_pos,
                          int heads, int kv_heads, int hd, int capacity, int observe_from) {
  const int rows = int(q_pos.size()), L = int(k_pos.size());
  const int R = rows - observe_from;
  PrefillOnCpu r{std::vector<float>(size_t(rows) * heads * hd), std::vector<float>(size_t(kv_heads) * L, 0.0f),
                 std::vector<float>(size_t(kv_heads) * R * L, 0.0f)};
  std::vector<float> probs(size_t(rows) * L);
  for (int h = 0; h < heads; ++h) {
    const int g = h / (heads / kv_heads);
    const size_t off = size_t(g) * capacity * hd;
    kernels::attendHead(q.data() + h * hd, stride, q_pos.data(), rows, K.data() + off, V.data() + off, k_pos.data(), L,
                        hd, 1.0f / std::sqrt(float(hd)), r.out.data() + h * hd, heads * hd, probs.data());
    for (int t = observe_from; t < rows; ++t)
      for (int l = 0; l < L; ++l) {
        r.observed[size_t(g) * L + l] += probs[size_t(t) * L + l];
        r.observed_rows[(size_t(g) * R + t - observe_from) * L + l] += probs[size_t(t) * L + l];
      }
  }
  return r;
}

// The many-query path (score GEMMs, masked softmax, PV GEMM), in query chunks small enough that
// several run, over a cache with holes laid out [kv_head][capacity][head_dim].
TEST(CudaKernels, PrefillAttentionMatchesCpu) {
  REQUIRE_GPU();
  cuda::Blas blas;
  const int T = 150, heads = 8, kv_heads = 2, hd = 32, L = 400, capacity = 512;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int> k_pos(L), q_pos(T);
  for (int i = 0; i < L; ++i) k_pos[i] = i * 2 + (i % 3 == 0);
  for (int t = 0; t < T; ++t) q_pos[t] = 3 + 5 * t;  // the first query sees two keys, the last all
  const int stride = heads * hd + 40;                 // q rows inside wider rows (a fused QKV product)
  auto q = randn(size_t(T) * stride), K = randn(size_t(kv_heads) * capacity * hd), V = randn(K.size());
  const int observe_from = 100;  // the observed queries span two chunks
  const auto want = prefillOnCpu(q, stride, q_pos, K, V, k_pos, heads, kv_heads, hd, capacity, observe_from);
  DeviceBuffer<float> dq(q), dK(K), dV(V), dout(poisoned(want.out.size()));
  DeviceBuffer<int> dqp(q_pos), dkp(k_pos);
  const size_t score_bytes = size_t(40) * heads * L * 8;  // about 40 queries per chunk
  for (bool rows : {false, true}) {  // summed (SnapKV, H2O), a row each (Scissorhands)
    const auto& want_obs = rows ? want.observed_rows : want.observed;
    DeviceBuffer<float> dobs(std::vector<float>(want_obs.size(), 0.0f));
    cuda::attentionPrefill(blas, dq.get(), stride, dqp.get(), q_pos.data(), T, heads, dK.get(), dV.get(), dkp.get(),
                           k_pos.data(), L, kv_heads, hd, capacity, scale, dout.get(), score_bytes, dobs.get(),
                           observe_from, rows);
    EXPECT_LE(relError(dout.download(), want.out), 1e-5);
    EXPECT_LE(relError(dobs.download(), want_obs), 1e-5) << (rows ? "a row each" : "summed");
  }
}

std::vector<float> roundedTo(std::vector<float> v, bool bf16) {
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

// fp16/bf16 prefill: the tensor-core flash kernel for the rows before the observation window, the
// cuBLAS path for the window's rows (whose probabilities SnapKV sums), against the CPU on the
// same rounded K and V. Queries whose 64-row block sees only part of the cache, a first query that
// sees two keys, a block of queries past the last row, GQA.
template <class T>
void checkFlashPrefill(int hd, double tol) {
  cuda::Blas blas;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const int rows = 300, heads = 8, kv_heads = 2, L = 700, capacity = 800, observe_from = 250;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int> k_pos(L), q_pos(rows);
  for (int i = 0; i < L; ++i) k_pos[i] = i * 2 + (i % 3 == 0);
  for (int t = 0; t < rows; ++t) q_pos[t] = 3 + 4 * t;
  const int stride = heads * hd + 24;
  auto q = randn(size_t(rows) * stride);
  auto K = roundedTo(randn(size_t(kv_heads) * capacity * hd), bf16), V = roundedTo(randn(K.size()), bf16);
  const auto cpu = prefillOnCpu(q, stride, q_pos, K, V, k_pos, heads, kv_heads, hd, capacity, observe_from);
  const auto& want = cpu.out;
  const auto& want_obs = cpu.observed;
  ASSERT_TRUE(cuda::flashAttentionFits<T>(hd));
  DeviceBuffer<float> dq(q), dobs(std::vector<float>(want_obs.size(), 0.0f));
  DeviceBuffer<T> dK = deviceAs<T>(K), dV = deviceAs<T>(V), dout = deviceAs<T>(poisoned(want.size()));
  DeviceBuffer<int> dqp(q_pos), dkp(k_pos);
  cuda::attentionPrefill(blas, dq.get(), stride, dqp.get(), q_pos.data(), rows, heads, dK.get(), dV.get(), dkp.get(),
                         k_pos.data(), L, kv_heads, hd, capacity, scale, dout.get(), size_t(1) << 26, dobs.get(),
                         observe_from);
  const auto got = floatsOf(dout);
  auto part = [&](const std::vector<float>& v, int from, int to) {
    return std::vector<float>(v.begin() + size_t(from) * heads * hd, v.begin() + size_t(to) * heads * hd);
  };
  EXPECT_LE(relError(part(got, 0, observe_from), part(want, 0, observe_from)), tol) << "flash rows, hd " << hd;
  EXPECT_LE(relError(part(got, observe_from, rows), part(want, observe_from, rows)), tol) << "cuBLAS rows, hd " << hd;
  EXPECT_LE(relError(dobs.download(), want_obs), tol) << "observation, hd " << hd;
}
TEST(CudaKernels, FlashPrefillMatchesCpuInFp16) {
  REQUIRE_GPU();
  for (int hd : {64, 128}) checkFlashPrefill<__half>(hd, 2e-3);
}
TEST(CudaKernels, FlashPrefillMatchesCpuInBf16) {
  REQUIRE_GPU();
  for (int hd : {64, 128}) checkFlashPrefill<__nv_bfloat16>(hd, 1.5e-2);
}

// The MLP's first product and activation: one row through the fused GEMV epilogue, several
// through cuBLAS and the activation kernel, both against the CPU's linear + siluMul / relu.
TEST(CudaKernels, GemmActivationMatchesCpu) {
  REQUIRE_GPU();
  cuda::Blas blas;
  const int in = 256;
  for (auto act : {cuda::Activation::SiluMul, cuda::Activation::Relu})
  for (auto [rows, F] : {std::pair{1, 300}, {5, 300}, {1, 20000}}) {
    const bool silu = act == cuda::Activation::SiluMul;
    const int out = silu ? 2 * F : F;
    auto x = randn(size_t(rows) * in), W = randn(size_t(out) * in, 0.1f), b = randn(out);
    std::vector<float> y(size_t(rows) * out), want(size_t(rows) * F);
    kernels::linear(x.data(), rows, in, W.data(), out, b.data(), y.data());
    for (int r = 0; r < rows; ++r) {
      float* yr = &y[size_t(r) * out];
      if (silu) kernels::siluMul(yr, yr + F, F);
      else kernels::relu(yr, F);
      std::copy_n(yr, F, &want[size_t(r) * F]);
    }
    DeviceBuffer<float> dx(x), dW(W), db(b), scratch(size_t(rows) * out), dout(poisoned(want.size()));
    cuda::gemmActivation(blas, dx.get(), rows, in, dW.get(), F, db.get(), act, scratch.get(), dout.get());
    EXPECT_LE(relError(dout.download(), want), kTol) << (silu ? "silu" : "relu") << " rows " << rows << " F " << F;
  }
}

// A compressed cache: every KV head holds its own number of entries at its own positions; the
// probabilities each KV head's entries got, summed over its query heads (what a per-step eviction
// policy scores by), for a group of 2 (one block a KV head) and of 16 (two blocks of 8).
TEST(CudaKernels, AttentionOverHeadsOfDifferentLengths) {
  REQUIRE_GPU();
  for (const int heads : {8, 64}) {
    const int T = 1, kv_heads = 4, hd = 64, capacity = 1000;
    const float scale = 1.0f / std::sqrt(float(hd));
    const std::vector<int> lengths = {1000, 37, 512, 1};
    std::vector<int> k_pos(size_t(kv_heads) * capacity, 1 << 30), q_pos = {1500};  // head 0's later entries unseen
    for (int g = 0; g < kv_heads; ++g)
      for (int i = 0; i < lengths[g]; ++i) k_pos[size_t(g) * capacity + i] = i * (g + 2);  // ascending, per head
    auto q = randn(size_t(heads) * hd), K = randn(size_t(kv_heads) * capacity * hd), V = randn(K.size());
    std::vector<float> want(size_t(heads) * hd), want_weights(size_t(kv_heads) * capacity, -1.0f), probs(capacity);
    for (int g = 0; g < kv_heads; ++g) std::fill_n(want_weights.begin() + size_t(g) * capacity, lengths[g], 0.0f);
    for (int h = 0; h < heads; ++h) {
      const int g = h / (heads / kv_heads);
      const size_t off = size_t(g) * capacity * hd;
      kernels::attendHead(q.data() + h * hd, heads * hd, q_pos.data(), T, K.data() + off, V.data() + off,
                          k_pos.data() + size_t(g) * capacity, lengths[g], hd, scale, want.data() + h * hd, heads * hd,
                          probs.data());
      for (int i = 0; i < lengths[g]; ++i) want_weights[size_t(g) * capacity + i] += probs[i];
    }
    DeviceBuffer<float> dq(q), dK(K), dV(V), dout(poisoned(want.size()));
    DeviceBuffer<float> dweights(std::vector<float>(want_weights.size(), -1.0f));  // past each length: untouched
    DeviceBuffer<int> dqp(q_pos), dkp(k_pos), dlen(lengths);
    cuda::attention(dq.get(), heads * hd, dqp.get(), T, heads, dK.get(), dV.get(), dkp.get(), capacity, kv_heads, hd,
                    int64_t(capacity) * hd, scale, dout.get(), dlen.get(), capacity, dweights.get());
    EXPECT_LE(relError(dout.download(), want), 1e-5) << heads << " heads";
    EXPECT_LE(relError(dweights.download(), want_weights), 1e-5) << heads << " heads";
    EXPECT_EQ(std::count(want_weights.begin(), want_weights.begin() + lengths[0], 0.0f), 1000 - 751)
        << "head 0's entries past position 1500 are unseen";
  }
}

// An int8 cache (kv::KVCache's Int8 form) on the device: the step's new row quantized as the CPU
// quantizes (the same codes and steps), attention over the older rows as codes x step and the new
// row at full precision (the CPU quantizes a step's rows after it), and rows back to float for
// the prefill's stage. Heads of different lengths.
TEST(CudaKernels, Int8CacheMatchesCpu) {
  REQUIRE_GPU();
  const int heads = 8, kv_heads = 2, hd = 64, capacity = 300, Q = heads * hd, KV = kv_heads * hd, W = Q + 2 * KV;
  const std::vector<int> old = {200, 57}, lengths = {201, 58};
  const float scale = 1.0f / std::sqrt(float(hd));
  // The older rows, quantized on the host.
  auto K = randn(size_t(kv_heads) * capacity * hd), V = randn(K.size(), 3.0f);
  std::vector<int8_t> K8(K.size()), V8(V.size());
  std::vector<float> k_step(size_t(kv_heads) * capacity), v_step(k_step.size());
  std::vector<int> k_pos(k_step.size(), 1 << 30), q_pos = {500}, first = old;
  auto quantize = [&](const float* x, int8_t* codes, float& step) {
    step = kv::fitInt8(x, hd);
    for (int c = 0; c < hd; ++c) codes[c] = int8_t(kv::encodeInt8(x[c], step));
  };
  for (int g = 0; g < kv_heads; ++g)
    for (int l = 0; l < old[g]; ++l) {
      const size_t r = size_t(g) * capacity + l;
      quantize(&K[r * hd], &K8[r * hd], k_step[r]);
      quantize(&V[r * hd], &V8[r * hd], v_step[r]);
      k_pos[r] = 2 * l + g;
    }
  const auto qkv = randn(W);
  DeviceBuffer<int8_t> dK8(K8), dV8(V8);
  DeviceBuffer<float> dks(k_step), dvs(v_step), dqkv(qkv), dout(poisoned(size_t(heads) * hd));
  DeviceBuffer<int> dpos(k_pos), dqp(q_pos), dfirst(first), dlen(lengths);
  const cuda::Int8Append cache{hd, dK8.get(), dV8.get(), dks.get(), dvs.get(), dpos.get(), capacity, dqkv.get(), W,
                               Q, Q + KV, dfirst.get(), dqp.get()};
  cuda::quantizeAppend(1, kv_heads, cache);
  const cuda::Int8Rows rows{dks.get(), dvs.get(), dqkv.get() + Q, dqkv.get() + Q + KV, W, dfirst.get()};
  cuda::attention(dqkv.get(), W, dqp.get(), 1, heads, dK8.get(), dV8.get(), dpos.get(), capacity, kv_heads, hd,
                  int64_t(capacity) * hd, scale, dout.get(), dlen.get(), capacity, nullptr, &rows);

  // The new row on the host: quantized the same way; attention over dequantized older rows + it.
  std::vector<float> deq(size_t(capacity) * hd), deq_v(deq.size()), want(size_t(heads) * hd);
  const auto got_K8 = dK8.download(), got_V8 = dV8.download();
  const auto got_ks = dks.download(), got_vs = dvs.download();
  const auto got_pos = dpos.download();
  for (int g = 0; g < kv_heads; ++g) {
    const size_t r = size_t(g) * capacity + old[g];
    quantize(&qkv[Q + g * hd], &K8[r * hd], k_step[r]);
    quantize(&qkv[Q + KV + g * hd], &V8[r * hd], v_step[r]);
    EXPECT_TRUE(std::equal(K8.begin() + r * hd, K8.begin() + (r + 1) * hd, got_K8.begin() + r * hd)) << "key codes";
    EXPECT_TRUE(std::equal(V8.begin() + r * hd, V8.begin() + (r + 1) * hd, got_V8.begin() + r * hd)) << "value codes";
    EXPECT_EQ(got_ks[r], k_step[r]);
    EXPECT_EQ(got_vs[r], v_step[r]);
    EXPECT_EQ(got_pos[r], q_pos[0]);
    std::vector<int> pos(got_pos.begin() + size_t(g) * capacity, got_pos.begin() + size_t(g) * capacity + lengths[g]);
    for (int l = 0; l < lengths[g]; ++l)
      for (int c = 0; c < hd; ++c) {
        const size_t e = (size_t(g) * capacity + l) * hd + c;
        deq[size_t(l) * hd + c] = l < old[g] ? float(K8[e]) * k_step[size_t(g) * capacity + l] : qkv[Q + g * hd + c];
        deq_v[size_t(l) * hd + c] = l < old[g] ? float(V8[e]) * v_step[size_t(g) * capacity + l] : qkv[Q + KV + g * hd + c];
      }
    for (int h = g * (heads / kv_heads); h < (g + 1) * (heads / kv_heads); ++h)
      kernels::attendHead(qkv.data() + h * hd, W, q_pos.data(), 1, deq.data(), deq_v.data(), pos.data(), lengths[g], hd,
                          scale, want.data() + h * hd, heads * hd);
  }
  EXPECT_LE(relError(dout.download(), want), 1e-5);

  // Back to float: every head's first 57 rows, into a stage of 60 rows a head.
  const int count = 57, stage = 60;
  DeviceBuffer<float> sK(poisoned(size_t(kv_heads) * stage * hd)), sV(poisoned(sK.size()));
  DeviceBuffer<int> sp(std::vector<int>(size_t(kv_heads) * stage, -1));
  cuda::dequantizeRows(cache, kv_heads, count, sK.get(), sV.get(), sp.get(), stage);
  const auto gK = sK.download(), gV = sV.download();
  const auto gp = sp.download();
  for (int g = 0; g < kv_heads; ++g)
    for (int l = 0; l < count; ++l) {
      const size_t from = size_t(g) * capacity + l, to = size_t(g) * stage + l;
      EXPECT_EQ(gp[to], k_pos[from]);
      for (int c = 0; c < hd; c += 13) {
        EXPECT_EQ(gK[to * hd + c], float(K8[from * hd + c]) * k_step[from]);
        EXPECT_EQ(gV[to * hd + c], float(V8[from * hd + c]) * v_step[from]);
      }
    }
}

// Eviction on the device: each head keeps its own ascending rows, moved to the front with their
// positions; rows past the kept count are left alone.
TEST(CudaKernels, CompactKeepsEachHeadsRowsInOrder) {
  REQUIRE_GPU();
  const int kv_heads = 3, hd = 16, capacity = 50, max_kept = 20;
  const std::vector<std::vector<int>> keep = {{0, 1, 2, 40, 49}, {}, {3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22}};
  auto K = randn(size_t(kv_heads) * capacity * hd), V = randn(K.size());
  std::vector<int> pos(size_t(kv_heads) * capacity), flat(size_t(kv_heads) * max_kept, 0), kept;
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = int(i);
  for (int g = 0; g < kv_heads; ++g) {
    kept.push_back(int(keep[g].size()));
    std::copy(keep[g].begin(), keep[g].end(), flat.begin() + size_t(g) * max_kept);
  }
  DeviceBuffer<float> dK(K), dV(V);
  DeviceBuffer<int> dpos(pos), dkeep(flat), dkept(kept);
  cuda::compactKV(dK.get(), dV.get(), dpos.get(), capacity, kv_heads, hd, dkeep.get(), dkept.get(), max_kept);
  const auto gk = dK.download(), gv = dV.download();
  const auto gp = dpos.download();
  for (int g = 0; g < kv_heads; ++g)
    for (int j = 0; j < int(keep[g].size()); ++j) {
      const size_t to = size_t(g) * capacity + j, from = size_t(g) * capacity + keep[g][j];
      EXPECT_EQ(gp[to], pos[from]);
      for (int d = 0; d < hd; ++d) {
        ASSERT_EQ(gk[to * hd + d], K[from * hd + d]) << g << " " << j;
        ASSERT_EQ(gv[to * hd + d], V[from * hd + d]) << g << " " << j;
      }
    }
  EXPECT_EQ(gk[(size_t(0) * capacity + 45) * hd], K[(size_t(0) * capacity + 45) * hd]);  // past the kept: untouched
}

// Host-held forms (tiered precision on the GPU): a step's new rows read out of an fp16 cache at
// each head's own first slot, widened to float exactly; float rows written back at scattered cache
// rows, rounded to fp16 as the host rounds them, the other rows untouched.
TEST(CudaKernels, HostHeldRowsGoBothWays) {
  REQUIRE_GPU();
  const int heads = 3, hd = 32, capacity = 40, rows = 2;
  const std::vector<int> first = {0, 17, 38};
  std::vector<__half> K(size_t(heads) * capacity * hd), V(K.size());
  const auto k0 = randn(K.size()), v0 = randn(V.size());
  for (size_t i = 0; i < K.size(); ++i) K[i] = __float2half_rn(k0[i]), V[i] = __float2half_rn(v0[i]);
  DeviceBuffer<__half> dK(K), dV(V);
  DeviceBuffer<int> dfirst(first);
  DeviceBuffer<float> out_k(poisoned(size_t(heads) * rows * hd)), out_v(poisoned(size_t(heads) * rows * hd));
  cuda::readNewRows(dK.get(), dV.get(), capacity, heads, hd, dfirst.get(), rows, out_k.get(), out_v.get());
  const auto gk = out_k.download(), gv = out_v.download();
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < rows; ++t)
      for (int c = 0; c < hd; ++c) {
        const size_t from = (size_t(h) * capacity + first[h] + t) * hd + c, to = (size_t(h) * rows + t) * hd + c;
        ASSERT_EQ(gk[to], __half2float(K[from])) << h << " " << t;
        ASSERT_EQ(gv[to], __half2float(V[from])) << h << " " << t;
      }
  const std::vector<int64_t> at = {5, 1 * capacity + 39, 2 * capacity};
  const auto k = randn(at.size() * hd), v = randn(at.size() * hd);
  DeviceBuffer<int64_t> dat(at);
  DeviceBuffer<float> dk(k), dv(v);
  cuda::writeRows(dK.get(), dV.get(), hd, dat.get(), int(at.size()), dk.get(), dv.get());
  auto wk = dK.download(), wv = dV.download();
  for (size_t i = 0; i < at.size(); ++i)
    for (int c = 0; c < hd; ++c) {
      EXPECT_EQ(__half2float(wk[at[i] * hd + c]), __half2float(__float2half_rn(k[i * hd + c])));
      EXPECT_EQ(__half2float(wv[at[i] * hd + c]), __half2float(__float2half_rn(v[i * hd + c])));
      wk[at[i] * hd + c] = K[at[i] * hd + c], wv[at[i] * hd + c] = V[at[i] * hd + c];
    }
  for (size_t i = 0; i < K.size(); ++i) ASSERT_EQ(__half2float(wk[i]), __half2float(K[i])) << "row " << i / hd;
}

// The budget's select on the device (cuda::evictionDecide: byte histograms, a block per pool
// picking each byte, ties shared out by a scan over each pool's heads) against its CPU twin,
// kv::selectBudget, entry for entry: 3 layers x 100 heads (a global pool's 300 heads take the tie
// shares' scan past one block of 256), keys drawn from a few values so that ties decide much, with
// holes (-inf) and protected entries (+inf), budgets from none to past every entry; one global
// pool, a pool per layer, a pool per head.
TEST(CudaKernels, BudgetSelectKeepsWhatTheCpuSelectKeeps) {
  REQUIRE_GPU();
  const int L = 3, H = 100, LH = L * H;
  std::mt19937 rng(7);
  const double values[] = {-INFINITY, 0.25, 0.5, 0.5, 1.0, 2.0, 1e300, INFINITY};
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<std::vector<double>> keys(LH);
    std::vector<int> lengths(LH), offsets(LH), head_table(LH);
    std::vector<double> table;
    for (int i = 0; i < LH; ++i) {
      lengths[i] = int(rng() % 41), offsets[i] = int(table.size()), head_table[i] = i;
      for (int e = 0; e < lengths[i]; ++e) {
        // Half the trials Scissorhands-like keys — counts of bits, protected and holes — whose
        // threshold the device finds before its eighth pass (the keys under the prefix are one).
        const double k = trial % 2 ? (rng() % 8 == 0 ? values[rng() % 2 ? 0 : 7] : double(rng() % 17))
                         : rng() % 4 == 0 ? std::ldexp(double(rng() % 1000), -int(rng() % 8))
                                          : values[rng() % 8];
        keys[i].push_back(k), table.push_back(k);
      }
    }
    for (const int pools : {1, L, LH}) {
      std::vector<int> pool_of(LH);
      std::vector<int64_t> entries(pools, 0), budget(pools);
      for (int t = 0; t < LH; ++t) pool_of[t] = t / (LH / pools), entries[pool_of[t]] += lengths[t];
      for (int p = 0; p < pools; ++p) budget[p] = int64_t(rng() % uint64_t(entries[p] + 3));
      std::vector<kv::SelectHead> heads;
      for (int i = 0; i < LH; ++i) heads.push_back({keys[i].data(), lengths[i], i, true});
      std::vector<std::vector<uint8_t>> cpu;
      kv::selectBudget(heads, pool_of, budget, nullptr, cpu);

      DeviceBuffer<double> dtable(table.empty() ? std::vector<double>{0} : table);
      DeviceBuffer<int> dlengths(lengths), doffsets(offsets), dhead_table(head_table), dpool_of(pool_of);
      DeviceBuffer<int64_t> dbudget(budget);
      DeviceBuffer<uint8_t> dkeep(std::max<size_t>(table.size(), 1));
      cuda::EvictionCache c{};
      c.layers = L, c.heads = H, c.length = dlengths.get(), c.table_offset = doffsets.get();
      const cuda::SelectLayout layout{dhead_table.get(), dpool_of.get(), dbudget.get(), LH, pools, true};
      cuda::evictionDecide(c, dtable.get(), layout, {}, dkeep.get());
      const auto gpu = dkeep.download();
      for (int i = 0; i < LH; ++i)
        for (int e = 0; e < lengths[i]; ++e)
          ASSERT_EQ(bool(gpu[size_t(offsets[i]) + e]), bool(cpu[i][e]))
              << "trial " << trial << ", " << pools << " pools, head " << i << ", entry " << e << ", key "
              << keys[i][e] << ", budget " << budget[pool_of[i]];
    }
  }
}

// KIVI thinned by eviction: cuda::kiviEvictionCompact against its CPU twin, kv::KVCache::retain
// over KIVI entries. Two heads of 30 entries, 5 runs of 4 coded then 10 at full precision in a
// ring of 16; head 0 loses three coded rows and two full ones (its holes stay: 8 x 3 is not past
// its 28 slots after), head 1 all of run 1 and most of the others (compacted, its runs renumbered).
// Then again with every head compacted. The
// device's kept entries, in order, must be the CPU's: the same codes, value pairs, key pairs (run
// by run), full rows and positions, and as many runs with a kept row. The coded rows' arrays hold
// fewer rows a head than the slots' (the engine sizes them by what eviction keeps). The pairs held as E: fp32
// (the CPU's) and fp16 (an fp16 cache's, the CPU's rounded; cuda::AffinePair).
template <class E>
bool samePairs(const cuda::AffinePair<E>* device, const float* cpu, int n) {
  for (int i = 0; i < n; ++i) {
    const float2 d = device[i].get(), c = cuda::AffinePair<E>::rounded(cpu[2 * i], cpu[2 * i + 1]).get();
    if (d.x != c.x || d.y != c.y) return false;
  }
  return true;
}

template <class E>
void kiviCompactionThinsRunsAsTheCpuDoes() {
  using Pair = cuda::AffinePair<E>;
  const int H = 2, hd = 16, bits = 4, G = 4, n = 30, coded = 20, capacity = 40, code_capacity = 24, R = 16;
  const std::vector<std::vector<int>> evicted = {{5, 13, 14, 22, 27}, {0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 15, 17, 18, 21}};
  for (const bool compact_all : {false, true}) {
    kv::KVCache cpu(1, H, hd);
    const auto k = randn(size_t(n) * H * hd), v = randn(k.size());
    for (int t = 0; t < n; ++t) cpu.append(0, &k[size_t(t) * H * hd], &v[size_t(t) * H * hd], &t, 1);
    std::vector<std::vector<int>> runs(size_t(coded / G));  // entries 0..19 in runs of G
    for (int i = 0; i < coded; ++i) runs[size_t(i / G)].push_back(i);
    for (int h = 0; h < H; ++h) cpu.quantizeKivi(0, h, runs, bits, G);
    const int cb = hd * bits / 8, VG = hd / G;  // codes of a key (or value) row; value groups
    // The device's layout of the same cache: codes and value pairs per slot, key pairs per run.
    std::vector<uint8_t> K(size_t(H) * code_capacity * cb), V(K.size());
    std::vector<Pair> vp(size_t(H) * code_capacity * VG), kp(size_t(H) * (capacity / G + 1) * hd);
    auto rounded = [](const float* pairs, int count, Pair* to) {
      for (int i = 0; i < count; ++i) to[i] = Pair::rounded(pairs[2 * i], pairs[2 * i + 1]);
    };
    std::vector<float> ring_k(size_t(H) * R * hd), ring_v(ring_k.size());
    std::vector<int> run(size_t(H) * code_capacity), pos(size_t(H) * capacity), flags, offsets, lengths, codeds;
    for (int h = 0; h < H; ++h) {
      const kv::HeadCache& c = cpu.head(0, h);
      for (int i = 0; i < n; ++i) {
        const size_t slot = size_t(h) * capacity + i, row = size_t(h) * code_capacity + i;
        pos[slot] = c.positions[i];
        if (i < coded) {
          std::copy_n(&c.codes[size_t(i) * 2 * cb], cb, &K[row * cb]);
          std::copy_n(&c.codes[size_t(i) * 2 * cb + cb], cb, &V[row * cb]);
          rounded(&c.row_params[size_t(i) * 2 * VG], VG, &vp[row * VG]);
          run[row] = i / G;
        } else {
          std::copy_n(&c.keys[size_t(i - coded) * hd], hd, &ring_k[(size_t(h) * R + i % R) * hd]);
          std::copy_n(&c.values[size_t(i - coded) * hd], hd, &ring_v[(size_t(h) * R + i % R) * hd]);
        }
      }
      rounded(c.key_params.data(), int(c.key_params.size() / 2), &kp[size_t(h) * (capacity / G + 1) * hd]);
      std::vector<int> keep;
      for (int i = 0; i < n; ++i) {
        const bool out = std::count(evicted[h].begin(), evicted[h].end(), i);
        flags.push_back(!out);
        if (!out) keep.push_back(i);
      }
      offsets.push_back(h * n), lengths.push_back(n), codeds.push_back(coded);
      cpu.retain(0, h, keep);
    }
    DeviceBuffer<uint8_t> dK(K), dV(V), dflags(std::vector<uint8_t>(flags.begin(), flags.end()));
    DeviceBuffer<Pair> dvp(vp), dkp(kp);
    DeviceBuffer<float> drk(ring_k), drv(ring_v);
    DeviceBuffer<int> drun(run), dpos(pos), doff(offsets), dlen(lengths), dcoded(codeds), dmap(size_t(H) * (capacity / G + 1)),
        dout(size_t(5) * H);
    DeviceBuffer<uint8_t> scratch(size_t(H) * R * 2 * hd * sizeof(float));
    DeviceBuffer<void*> ptrs(std::vector<void*>{dK.get(), dV.get(), dpos.get(), dkp.get(), dvp.get(), drun.get(), drk.get(), drv.get()});
    void** p = ptrs.get();
    cuda::EvictionCache rows{1, H, capacity, cb, cuda::KeyFormat::F32, p, p + 1, reinterpret_cast<int* const*>(p + 2),
                             nullptr, nullptr, nullptr, nullptr, 0, nullptr, 0, 0, dlen.get(), doff.get()};
    rows.code_capacity = code_capacity;
    const cuda::KiviEviction kivi{hd, cb, VG, R, int(hd * sizeof(float)), int(sizeof(Pair)),
                                  capacity / G + 1, p + 3, p + 4, reinterpret_cast<int* const*>(p + 5), p + 6, p + 7,
                                  dcoded.get(), dmap.get(), scratch.get()};
    cuda::kiviEvictionCompact(rows, kivi, dflags.get(), compact_all, dout.get());
    const auto gK = dK.download(), gV = dV.download();
    const auto gvp = dvp.download(), gkp = dkp.download(), grk = drk.download(), grv = drv.download();
    const auto grun = drun.download(), gpos = dpos.download(), out = dout.download();
    for (int h = 0; h < H; ++h) {
      const kv::HeadCache& c = cpu.head(0, h);
      const int kept_coded = int(std::count(c.form.begin(), c.form.end(), kv::Form::Kivi)), kept = c.length();
      const bool all = compact_all || out[4 * H + h];
      const std::string what = std::string(compact_all ? "compact all" : "holes allowed") + ", head " + std::to_string(h);
      EXPECT_EQ(out[h + H], kept) << what;
      EXPECT_EQ(out[2 * H + h], all ? kept_coded : coded) << what;
      EXPECT_EQ(out[h], out[2 * H + h] + kept - kept_coded) << what;
      EXPECT_EQ(out[3 * H + h], int(c.group_rows.size())) << what;
      EXPECT_EQ(h == 1 || compact_all, bool(out[4 * H + h])) << what;
      // Coded entries: the device's kept slots in order; the CPU's group of each, by its row counts.
      int j = 0, group = 0, left = c.group_rows.empty() ? 0 : c.group_rows[0];
      for (int slot = 0; slot < out[2 * H + h]; ++slot) {
        const size_t s = size_t(h) * capacity + slot, r = size_t(h) * code_capacity + slot;
        if (gpos[s] == cuda::kEvicted) continue;
        ASSERT_LT(j, kept_coded) << what;
        EXPECT_EQ(gpos[s], c.positions[j]) << what;
        EXPECT_TRUE(std::equal(&gK[r * cb], &gK[r * cb] + cb, &c.codes[size_t(j) * 2 * cb])) << what << " entry " << j;
        EXPECT_TRUE(std::equal(&gV[r * cb], &gV[r * cb] + cb, &c.codes[size_t(j) * 2 * cb + cb])) << what << " entry " << j;
        EXPECT_TRUE(samePairs(&gvp[r * VG], &c.row_params[size_t(j) * 2 * VG], VG)) << what;
        if (all) EXPECT_EQ(grun[r], group) << what << ": runs renumbered in order";
        const Pair* pairs = &gkp[(size_t(h) * (capacity / G + 1) + grun[r]) * hd];
        EXPECT_TRUE(samePairs(pairs, &c.key_params[size_t(group) * 2 * hd], hd)) << what << " entry " << j;
        ++j;
        if (--left == 0 && group + 1 < int(c.group_rows.size())) left = c.group_rows[++group];
      }
      EXPECT_EQ(j, kept_coded) << what;
      for (int r = 0; r < kept - kept_coded; ++r) {  // the full-precision rows, after the coded slots
        const int slot = out[2 * H + h] + r;
        EXPECT_EQ(gpos[size_t(h) * capacity + slot], c.positions[kept_coded + r]) << what;
        const size_t at = (size_t(h) * R + slot % R) * hd;
        EXPECT_TRUE(std::equal(&grk[at], &grk[at] + hd, &c.keys[size_t(r) * hd])) << what << " full row " << r;
        EXPECT_TRUE(std::equal(&grv[at], &grv[at] + hd, &c.values[size_t(r) * hd])) << what << " full row " << r;
      }
    }
    if (!compact_all || !std::is_same_v<E, float>) continue;
    // The compacted cache's rows as a host decision reads them (cuda::cachedRows): the CPU's
    // kv::KVCache::rows, codes decoded with their pairs and the ring's rows, bit for bit (fp32
    // pairs: the CPU's).
    std::vector<int> offsets_after, lengths_after, coded_after;
    for (int h = 0, at = 0; h < H; ++h) {
      offsets_after.push_back(at), lengths_after.push_back(out[h]), coded_after.push_back(out[2 * H + h]);
      at += out[h];
    }
    DeviceBuffer<int> doff2(offsets_after), dlen2(lengths_after), dcoded2(coded_after);
    cuda::EvictionCache kivi_rows{1, H, capacity, cb, cuda::KeyFormat::Kivi, p, p + 1,
                                  reinterpret_cast<int* const*>(p + 2), nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                  0, 0, dlen2.get(), doff2.get()};
    kivi_rows.kivi = {hd, bits, G, R, cuda::KeyFormat::F32, capacity / G + 1, p + 3, p + 4,
                      reinterpret_cast<const int* const*>(p + 5), p + 6, p + 7, dcoded2.get()};
    kivi_rows.code_capacity = code_capacity;
    const int entries = out[0] + out[1];
    DeviceBuffer<float> dkeys(size_t(entries) * hd), dvalues(size_t(entries) * hd);
    cuda::cachedRows(kivi_rows, hd, dkeys.get(), dvalues.get());
    const auto keys = dkeys.download(), values = dvalues.download();
    for (int h = 0; h < H; ++h) {
      std::vector<float> scratch;
      const kv::HeadRows r = cpu.rows(0, h, scratch);
      const size_t first = size_t(offsets_after[h]) * hd, count = size_t(lengths_after[h]) * hd;
      EXPECT_TRUE(std::equal(&keys[first], &keys[first] + count, r.keys)) << "head " << h << ": keys";
      EXPECT_TRUE(std::equal(&values[first], &values[first] + count, r.values)) << "head " << h << ": values";
    }
  }
}

TEST(CudaKernels, KiviCompactionThinsRunsAsTheCpuDoes) {
  REQUIRE_GPU();
  kiviCompactionThinsRunsAsTheCpuDoes<float>();
}

TEST(CudaKernels, KiviCompactionMovesFp16Pairs) {
  REQUIRE_GPU();
  kiviCompactionThinsRunsAsTheCpuDoes<__half>();
}

// The row-scored methods' keys (cuda::evictionKeys) against kv/scorers.cpp over the same fp32
// rows, past holes: the device does the CPU's operations in the CPU's order, so the keys agree to
// the last bits (the engine's rows differ from the CPU's in theirs, and under eviction a swap at
// the budget's boundary compounds: CUR's windows and LagKV's partitions shift — this pins the
// arithmetic where the engine test cannot).
TEST(CudaKernels, RowScoresMatchTheCpuPastHoles) {
  REQUIRE_GPU();
  const int H = 2, hd = 16, capacity = 64, n = 58, sinks = 2;
  const std::vector<std::vector<int>> holes = {{3, 17, 18, 40}, {0, 9, 10, 11, 30, 31, 57}};
  const auto K = randn(size_t(H) * capacity * hd), V = randn(K.size()), filters = randn(size_t(H) * hd);
  std::vector<int> pos(size_t(H) * capacity, cuda::kEvicted), offsets, lengths;
  for (int h = 0; h < H; ++h) {
    for (int i = 0; i < n; ++i)
      if (!std::count(holes[h].begin(), holes[h].end(), i)) pos[size_t(h) * capacity + i] = i;
    offsets.push_back(h * n), lengths.push_back(n);
  }
  DeviceBuffer<float> dK(K), dV(V), dfilters(filters);
  DeviceBuffer<int> dpos(pos), doff(offsets), dlen(lengths), dslots(size_t(H) * n);
  DeviceBuffer<double> dtable(size_t(H) * n), dsums(size_t(4) * H * n);
  DeviceBuffer<void*> ptrs(std::vector<void*>{dK.get(), dV.get(), dpos.get()});
  void** p = ptrs.get();
  const cuda::EvictionCache rows{1, H, capacity, int(hd * sizeof(float)), cuda::KeyFormat::F32, p, p + 1,
                                 reinterpret_cast<int* const*>(p + 2), nullptr, nullptr, nullptr, nullptr, 0, nullptr,
                                 0, 0, dlen.get(), doff.get()};
  struct Case {
    const char* name;
    cuda::EvictScore method;
    int local;
  };
  for (const Case& m : {Case{"knorm", cuda::EvictScore::KeyNorm, 0}, Case{"keydiff", cuda::EvictScore::KeyDiff, 0},
                        Case{"qfilters", cuda::EvictScore::QueryFilter, 0}, Case{"lagkv", cuda::EvictScore::Lag, 0},
                        Case{"cur local=16", cuda::EvictScore::CUR, 16}, Case{"cur local=0", cuda::EvictScore::CUR, 0},
                        Case{"cur local=5", cuda::EvictScore::CUR, 5}}) {
    cuda::ScoreInputs in;
    in.query_filters = dfilters.get(), in.lag = 8, in.local = m.local;
    in.row_sums = dsums.get(), in.entry_slots = dslots.get();
    const int protected_below = m.method == cuda::EvictScore::Lag ? sinks : 0;
    cuda::evictionKeys(rows, m.method, 0, 0, protected_below, 0, 1 << 20, dtable.get(), in);
    const auto table = dtable.download();
    for (int h = 0; h < H; ++h) {
      std::vector<float> k, v;
      std::vector<int> slots;
      for (int i = 0; i < n; ++i) {
        const size_t at = size_t(h) * capacity + i;
        if (pos[at] == cuda::kEvicted) continue;
        slots.push_back(i);
        k.insert(k.end(), &K[at * hd], &K[at * hd] + hd), v.insert(v.end(), &V[at * hd], &V[at * hd] + hd);
      }
      const int entries = int(slots.size());
      std::vector<double> cpu(slots.size());
      const kv::HeadRows r{k.data(), v.data()};
      switch (m.method) {
        case cuda::EvictScore::KeyNorm: kv::keyNormScores(r, entries, hd, cpu.data()); break;
        case cuda::EvictScore::KeyDiff: kv::keyDiffScores(r, entries, hd, cpu.data()); break;
        case cuda::EvictScore::QueryFilter:
          kv::queryFilterScores(r, entries, hd, &filters[size_t(h) * hd], cpu.data());
          break;
        case cuda::EvictScore::Lag: kv::lagScores(r, entries, hd, sinks, 8, cpu.data()); break;
        default: kv::curScores(r, entries, hd, m.local, cpu.data()); break;
      }
      for (int i = 0; i < n; ++i)
        if (std::count(holes[h].begin(), holes[h].end(), i)) EXPECT_EQ(table[size_t(h) * n + i], -INFINITY) << m.name;
      for (int e = 0; e < entries; ++e) {
        if (m.method == cuda::EvictScore::Lag && slots[e] < sinks) continue;  // protected: +inf on the device
        EXPECT_NEAR(table[size_t(h) * n + slots[e]], cpu[e], 1e-12 * std::abs(cpu[e]))
            << m.name << ", head " << h << ", entry " << e;
      }
    }
  }
}

// The prompt's decisions on the device against their CPU twins (kv/scorers.h), bit for bit: SnapKV's
// keys — the observation's probabilities (a fifth of them 0, as unseen keys are), ChunkKV's means
// (none, 4, 5), the max-pool of 7 (and of 1), the sinks and the recent window protected — and
// Scissorhands' history bits from the prompt's observed rows, the older entries' bits shifted on.
TEST(CudaKernels, PromptDecisionsMatchTheCpu) {
  REQUIRE_GPU();
  const int L = 2, H = 3, LH = L * H, capacity = 64, n = 53, rows = 5, fresh = 41, sinks = 2, recent = 6;
  std::mt19937 rng(11);
  std::vector<float> w(size_t(LH) * rows * n);
  for (float& x : w) x = rng() % 5 == 0 ? 0.0f : std::ldexp(float(rng() % 4096), -12);
  std::vector<int> pos(size_t(L) * H * capacity, cuda::kEvicted), offsets, lengths(LH, n);
  for (int lh = 0; lh < LH; ++lh) {
    offsets.push_back(lh * n);
    for (int i = 0; i < n; ++i) pos[size_t(lh) * capacity + i] = i;
  }
  std::vector<uint64_t> history(size_t(LH) * capacity);
  for (auto& b : history) b = (uint64_t(rng()) << 32) | rng();
  DeviceBuffer<float> dw(w);
  DeviceBuffer<int> dpos(pos), doff(offsets), dlen(lengths), dslots(size_t(LH) * n);
  DeviceBuffer<uint64_t> dhistory(history);
  DeviceBuffer<double> dtable(size_t(LH) * n);
  DeviceBuffer<void*> ptrs(std::vector<void*>{dpos.get(), dpos.get() + H * capacity});
  cuda::EvictionCache c{L, H, capacity, 4, cuda::KeyFormat::F32, nullptr, nullptr,
                        reinterpret_cast<int* const*>(ptrs.get()), nullptr, nullptr, nullptr, nullptr,
                        int64_t(H) * capacity, dw.get(), int64_t(H) * rows * n, int64_t(rows) * n, dlen.get(),
                        doff.get()};
  for (const int chunk : {1, 4, 5})
    for (const int pool : {7, 1}) {
      cuda::ScoreInputs in;
      in.chunk = chunk, in.pool = pool, in.entry_slots = dslots.get();
      cuda::evictionKeys(c, cuda::EvictScore::SnapKV, n, 0, sinks, recent, n - 1, dtable.get(), in);
      const auto table = dtable.download();
      for (int lh = 0; lh < LH; ++lh) {
        std::vector<double> key(w.begin() + int64_t(lh) * rows * n, w.begin() + int64_t(lh) * rows * n + n);
        if (chunk > 1) kv::chunkMeans(key, chunk);
        kv::maxPool(key, pool);
        for (int i = 0; i < n; ++i) {
          const double want = i < sinks || i > n - 1 - recent ? INFINITY : key[i];
          ASSERT_EQ(table[size_t(lh) * n + i], want) << "chunk " << chunk << ", pool " << pool << ", head " << lh
                                                     << ", entry " << i;
        }
      }
    }
  c.history = dhistory.get();
  cuda::promptHistory(c, fresh, rows, n);
  const auto bits = dhistory.download();
  for (int lh = 0; lh < LH; ++lh) {
    std::vector<uint64_t> cpu(history.begin() + int64_t(lh) * capacity, history.begin() + int64_t(lh) * capacity + n);
    std::fill(cpu.end() - fresh, cpu.end(), 0);
    for (int t = 0; t < rows; ++t) kv::appendHistoryBits(&w[(size_t(lh) * rows + t) * n], n, cpu.data());
    for (int i = 0; i < n; ++i) ASSERT_EQ(bits[size_t(lh) * capacity + i], cpu[i]) << "head " << lh << ", entry " << i;
  }
}

// A ring resized keeps each head's full-precision rows [coded, length): row l from l % 5 to l % 12.
TEST(CudaKernels, RingResizeMovesEachHeadsRows) {
  REQUIRE_GPU();
  const int heads = 3, hd = 8, from_rows = 5, to_rows = 12;
  const std::vector<int> coded = {0, 7, 20}, length = {4, 12, 20};
  const auto k = randn(size_t(heads) * from_rows * hd), v = randn(k.size());
  DeviceBuffer<float> dk(k), dv(v), tk(poisoned(size_t(heads) * to_rows * hd)), tv(poisoned(size_t(heads) * to_rows * hd));
  DeviceBuffer<int> dc(coded), dl(length);
  cuda::ringResize(dk.get(), dv.get(), from_rows, tk.get(), tv.get(), to_rows, heads, int(hd * sizeof(float)), dc.get(), dl.get());
  const auto gk = tk.download(), gv = tv.download();
  for (int h = 0; h < heads; ++h)
    for (int l = coded[h]; l < length[h]; ++l)
      for (int d = 0; d < hd; ++d) {
        EXPECT_EQ(gk[(size_t(h) * to_rows + l % to_rows) * hd + d], k[(size_t(h) * from_rows + l % from_rows) * hd + d]);
        EXPECT_EQ(gv[(size_t(h) * to_rows + l % to_rows) * hd + d], v[(size_t(h) * from_rows + l % from_rows) * hd + d]);
      }
}

// The attention block's input: the residual rows normalized (RMSNorm with RoPE as Llama,
// LayerNorm without as OPT), Q|K|V projected, RoPE on the Q and K heads, K and V appended to a
// cache laid out [kv_head][capacity][head_dim] at each head's own slot — one row through the GEMV
// whose epilogue rotates and appends, three through cuBLAS + ropeAppendKV — against the CPU's
// rmsNorm / layerNorm, linear, applyRope and a plain copy.
void checkQkvAppend(int T, bool llama) {
  cuda::Blas blas;
  const int in = 96, q_heads = 4, kv_heads = 2, hd = 64, Q = q_heads * hd, KV = kv_heads * hd, W = Q + 2 * KV;
  const int capacity = 16;
  const float eps = 1e-5f;
  const std::vector<int> first = {5, 2};  // the heads hold different counts (a compressed cache)
  std::vector<int> pos = {7, 8, 3000};
  pos.resize(T);
  auto x = randn(size_t(T) * in, 3.0f), nw = randn(in), nb = randn(in), Wt = randn(size_t(W) * in, 0.1f), b = randn(W);
  std::vector<float> inv(hd / 2);
  for (int i = 0; i < hd / 2; ++i) inv[i] = float(std::pow(10000.0, -2.0 * i / hd));
  std::vector<float> xn(x.size()), qkv(size_t(T) * W), q(size_t(T) * Q), k(size_t(T) * KV);
  if (llama) kernels::rmsNorm(x.data(), T, in, nw.data(), eps, xn.data());
  else kernels::layerNorm(x.data(), T, in, nw.data(), nb.data(), eps, xn.data());
  kernels::linear(xn.data(), T, in, Wt.data(), W, b.data(), qkv.data());
  for (int t = 0; t < T; ++t) {
    std::copy_n(&qkv[size_t(t) * W], Q, &q[size_t(t) * Q]);
    std::copy_n(&qkv[size_t(t) * W + Q], KV, &k[size_t(t) * KV]);
  }
  if (llama) {
    kernels::applyRope(q.data(), T, q_heads, hd, pos.data(), inv.data());
    kernels::applyRope(k.data(), T, kv_heads, hd, pos.data(), inv.data());
  }
  DeviceBuffer<float> dx(x), dnw(nw), dnb(nb), dW(Wt), db(b), dinv(inv), dxn(x.size()), dqkv(poisoned(qkv.size())),
      dK(poisoned(size_t(kv_heads) * capacity * hd)), dV(poisoned(size_t(kv_heads) * capacity * hd));
  DeviceBuffer<int> dpos(pos), dfirst(first), dkpos(std::vector<int>(size_t(kv_heads) * capacity, -1));
  DeviceBuffer<float2> rope(size_t(T) * hd / 2);
  cuda::ropeTable(dpos.get(), T, hd, dinv.get(), rope.get());
  if (llama) cuda::rmsNormTo(dx.get(), T, in, dnw.get(), eps, dxn.get());
  else cuda::layerNormTo(dx.get(), T, in, dnw.get(), dnb.get(), eps, dxn.get());
  const cuda::KvAppend<float> append{q_heads, kv_heads, hd, dpos.get(), llama ? rope.get() : nullptr,
                                     dK.get(), dV.get(), dkpos.get(), capacity, dfirst.get()};
  cuda::qkvAppend(blas, dxn.get(), T, in, dW.get(), db.get(), dqkv.get(), append);
  const auto out = dqkv.download(), K = dK.download(), V = dV.download();
  const auto kpos = dkpos.download();
  std::vector<float> got_q, want_k, got_k, want_v, got_v;
  for (int t = 0; t < T; ++t) {
    got_q.insert(got_q.end(), &out[size_t(t) * W], &out[size_t(t) * W + Q]);
    for (int h = 0; h < kv_heads; ++h) {
      EXPECT_EQ(kpos[size_t(h) * capacity + first[h] + t], pos[t]);
      for (int d = 0; d < hd; ++d) {
        const size_t slot = (size_t(h) * capacity + first[h] + t) * hd + d;
        want_k.push_back(k[size_t(t) * KV + h * hd + d]);
        got_k.push_back(K[slot]);
        want_v.push_back(qkv[size_t(t) * W + Q + KV + h * hd + d]);
        got_v.push_back(V[slot]);
      }
    }
  }
  const std::string what = std::string(llama ? "rmsnorm + rope" : "layernorm") + ", rows " + std::to_string(T);
  EXPECT_LE(relError(got_q, q), kTol) << what;
  EXPECT_LE(relError(got_k, want_k), kTol) << what;
  EXPECT_LE(relError(got_v, want_v), kTol) << what;
}
TEST(CudaKernels, QkvAppendMatchesCpu) {
  REQUIRE_GPU();
  for (int T : {1, 3})
    for (bool llama : {true, false}) checkQkvAppend(T, llama);
}

// A decode step's RMSNorm folded into the products around it (cuda::DeferredNorm): the residual's
// product emits x ∘ w and its partial sums of x², the next products (Q|K|V with RoPE and append,
// gate|up with SiLU·mul) scale their dots — against the CPU's linear, rmsNorm, linear, siluMul.
TEST(CudaKernels, DeferredRmsNormMatchesCpu) {
  REQUIRE_GPU();
  cuda::Blas blas;
  const int in = 96, H = 320, F = 200, q_heads = 2, kv_heads = 1, hd = 64, W = (q_heads + 2 * kv_heads) * hd;
  const float eps = 1e-5f;
  auto a = randn(in), Wo = randn(size_t(H) * in, 0.3f), bo = randn(H), x0 = randn(H, 2.0f), nw = randn(H);
  auto Wqkv = randn(size_t(W) * H, 0.1f), Wgu = randn(size_t(2 * F) * H, 0.1f);
  std::vector<float> x = x0, xn(H), qkv(W), gu(2 * F);
  kernels::linear(a.data(), 1, in, Wo.data(), H, bo.data(), x.data(), true);
  kernels::rmsNorm(x.data(), 1, H, nw.data(), eps, xn.data());
  kernels::linear(xn.data(), 1, H, Wqkv.data(), W, nullptr, qkv.data());
  kernels::linear(xn.data(), 1, H, Wgu.data(), 2 * F, nullptr, gu.data());
  kernels::siluMul(gu.data(), gu.data() + F, F);
  gu.resize(F);
  DeviceBuffer<float> da(a), dWo(Wo), dbo(bo), dx(x0), dnw(nw), dWqkv(Wqkv), dWgu(Wgu), fed(poisoned(H)),
      sums(poisoned(cuda::deferredNormSums(H))), dqkv(poisoned(W)), dact(poisoned(F)), scratch(2 * F),
      dK(size_t(kv_heads) * 4 * hd), dV(size_t(kv_heads) * 4 * hd);
  DeviceBuffer<int> dpos(std::vector<int>{0}), dfirst(std::vector<int>{0}), dkpos(std::vector<int>(4, -1));
  const cuda::DeferredNorm<float> norm{dnw.get(), fed.get(), sums.get(), eps};
  cuda::gemm(blas, da.get(), 1, in, dWo.get(), H, dbo.get(), dx.get(), true, &norm);
  // Position 0: RoPE is the identity there, so the Q|K|V row is the plain product.
  const cuda::KvAppend<float> append{q_heads, kv_heads, hd, dpos.get(), nullptr, dK.get(), dV.get(), dkpos.get(), 4,
                                     dfirst.get()};
  cuda::qkvAppend(blas, fed.get(), 1, H, dWqkv.get(), nullptr, dqkv.get(), append, &norm);
  cuda::gemmActivation(blas, fed.get(), 1, H, dWgu.get(), F, nullptr, cuda::Activation::SiluMul, scratch.get(),
                       dact.get(), &norm);
  EXPECT_LE(relError(dx.download(), x), kTol) << "the residual";
  EXPECT_LE(relError(dqkv.download(), qkv), kTol) << "q|k|v";
  EXPECT_LE(relError(dact.download(), gu), kTol) << "silu(gate) * up";
  // Two rows take the cuBLAS path, which cannot defer a norm: refused, not silently wrong.
  EXPECT_THROW(cuda::gemm(blas, da.get(), 2, in / 2, dWo.get(), H, nullptr, dx.get(), true, &norm), std::invalid_argument);
}

// Decode's GEMV kernel against cuBLAS on the same fp32 / fp16 inputs, with bias and accumulate;
// more rows than the GPU holds warps at once.
template <class T>
void checkGemv(int in, int out) {
  cuda::Blas blas;
  auto b = randn(out), y0 = randn(out);
  DeviceBuffer<T> dx = deviceAs<T>(randn(in)), dW = deviceAs<T>(randn(size_t(out) * in, 0.02f));
  DeviceBuffer<float> db(b), want(y0), got(y0);
  cuda::gemmBlas(blas, dx.get(), 1, in, dW.get(), out, db.get(), want.get(), true);
  cuda::gemm(blas, dx.get(), 1, in, dW.get(), out, db.get(), got.get(), true);
  EXPECT_LE(relError(got.download(), want.download()), 1e-5) << in << " x " << out;
}
TEST(CudaKernels, GemvMatchesCublasFp32) {
  REQUIRE_GPU();
  checkGemv<float>(4096, 1000);
  checkGemv<float>(512, 20000);
  checkGemv<float>(16384, 100);  // x past 48 KiB of shared memory
}
TEST(CudaKernels, GemvMatchesCublasFp16) {
  REQUIRE_GPU();
  checkGemv<__half>(4096, 1000);
  checkGemv<__half>(512, 20000);
  checkGemv<__half>(36864, 300);  // OPT-66B's down projection at tp 1
}

TEST(CudaKernels, SoftmaxPartialsMatchCpuOnAVocabShard) {
  REQUIRE_GPU();
  const int T = 9, V = 50272 / 2, offset = 50272 / 2;
  auto logits = randn(size_t(T) * V, 4.0f);
  std::vector<int> targets = {offset, offset + 5, 3, offset + V - 1, 100, offset + 777, 50271, 0, offset + 12345};
  std::vector<kernels::SoftmaxPartial> want(T);
  kernels::softmaxPartials(logits.data(), T, V, offset, targets.data(), want.data());
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<int> dt(targets);
  DeviceBuffer<kernels::SoftmaxPartial> dout(T);
  cuda::softmaxPartials(dl.get(), T, V, offset, dt.get(), dout.get());
  const auto got = dout.download();
  for (int t = 0; t < T; ++t) {
    EXPECT_EQ(got[t].max, want[t].max);
    EXPECT_NEAR(got[t].sum, want[t].sum, 1e-6 * want[t].sum);
    EXPECT_EQ(got[t].has_target, want[t].has_target);
    EXPECT_EQ(got[t].target, want[t].target);
  }
}

}  // namespace
}  // namespace kvtp
