// The forward pass's CUDA kernels (products, norms, RoPE, attention, the int8 cache) against their
// CPU twins on fresh random inputs, outputs poisoned with NaN first so an unwritten element fails;
// the cache's compression kernels: tests/cuda_eviction_kernels_test.cpp. Runs on the GPU machine;
// elsewhere each test says it skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu_ops.h"
#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/forward_ops.h"
#include "kv/kv_cache.h"
#include "tests/cuda_test_util.h"

namespace kvtp {
namespace {

using namespace cuda_test;

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
