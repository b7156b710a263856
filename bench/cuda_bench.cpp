// kvtp_cuda_bench: the GPU's two ceilings (device-to-device copy bandwidth, cuBLAS sgemm rate)
// and the kernels against them: decode attention (T = 1) over 2k/8k/32k-token caches, where the
// floor is reading K and V once; the decode attention's fixed costs, fp16 and KIVI (also as
// eviction leaves it; `kvtp_cuda_bench attention` runs these alone); the decode GEMVs against
// cuBLAS; a decode step's layers as one CUDA graph, piece by piece; prefill attention, flash
// against the cuBLAS path. CUDA events around each region, warm-up first, medians. Prints a
// table; docs/BENCHMARKS.md records it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/forward_ops.h"

namespace {
using namespace kvtp;

template <class F>
float medianMs(F&& f, int reps = 20) {
  cudaEvent_t a, b;
  KVTP_CUDA_CHECK(cudaEventCreate(&a));
  KVTP_CUDA_CHECK(cudaEventCreate(&b));
  f();
  f();  // warm-up
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    KVTP_CUDA_CHECK(cudaEventRecord(a));
    f();
    KVTP_CUDA_CHECK(cudaEventRecord(b));
    KVTP_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    KVTP_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::vector<float> random(size_t n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A launch's GPU time, ten launches in one CUDA graph as a decode step's layers run them: one
// launch between two events also times the host's launch, more than a small kernel's fixed costs.
// (gpu-check.sh's `attention` finds a case's launches for ncu by this count: 10 x medianMs' 22.)
template <class Launch>
float graphMs(Launch&& launch) {
  constexpr int launches = 10;
  cuda::GraphReplay graph;
  return medianMs([&] {
    graph.run(0, [&] {
      for (int i = 0; i < launches; ++i) launch();
    });
  }) / launches;
}

// Decode attention (T = 1) over Llama-2-7B's 32 KV heads of 128, fp16: full-precision caches of
// 64 to 8k rows a head, then KIVI 4's coded rows, also as eviction leaves them. The time against
// the rows a head gives a launch's fixed cost (the intercept) beside its cost a row.
void attentionFixedCosts() {
  std::printf("decode attention, 32 KV heads of 128, fp16, T = 1, in a graph:\n");
  for (int L : {64, 512, 2048, 8192}) {
    const int H = 32, hd = 128;
    cuda::DeviceBuffer<__half> K(size_t(H) * L * hd), V(K.size()), out(size_t(H) * hd);
    KVTP_CUDA_CHECK(cudaMemset(K.get(), 0, K.size() * 2));
    KVTP_CUDA_CHECK(cudaMemset(V.get(), 0, V.size() * 2));
    std::vector<int> kp(size_t(H) * L);
    for (size_t i = 0; i < kp.size(); ++i) kp[i] = int(i % L);
    cuda::DeviceBuffer<int> dkp(kp), dqp(std::vector<int>{L});
    cuda::DeviceBuffer<float> q(random(size_t(H) * hd));
    const float ms = graphMs([&] {
      cuda::attention(q.get(), H * hd, dqp.get(), 1, H, K.get(), V.get(), dkp.get(), L, H, hd, int64_t(L) * hd, 0.088f,
                      out.get(), nullptr, L);
    });
    const double bytes = 2.0 * H * L * hd * 2;
    std::printf("  %5d rows a head %7.1f us  %5.2f TB/s\n", L, ms * 1e3, bytes / (ms * 1e-3) / 1e12);
  }
  // KIVI 4, group 32, 16 rows in the ring: every row coded (no eviction), 32k down to 256 rows a
  // head, then 6.5k rows as Scissorhands 0.2 leaves them at 32k — each row's run from an index (a
  // run keeps a fifth of its rows) — and with the probabilities it scores by.
  std::printf("KIVI 4 decode attention, 32 KV heads of 128, fp16, T = 1, in a graph:\n");
  auto kiviAttention = [&](const std::string& what, int rows, int thin, bool probs) {
    using Pair = cuda::AffinePair<__half>;
    const int H = 32, hd = 128, group = 32, ring_rows = 128, ring_count = 16;
    const int64_t capacity = rows + ring_count, key_groups = int64_t(rows) * thin / group + 1;
    cuda::KiviCache<__half> kivi{hd, 4, group};
    const int cb = kivi.codeBytes(), vg = kivi.valueGroups();
    std::vector<uint8_t> codes(size_t(H) * capacity * cb);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t(i * 2654435761u >> 24);
    std::vector<int> pos(size_t(H) * capacity), run(pos.size()), counts(H, rows), lengths(H, rows + ring_count);
    const int p = rows * thin + ring_count;  // the query's position
    for (int h = 0; h < H; ++h)
      for (int l = 0; l < capacity; ++l) {
        const size_t at = size_t(h) * capacity + l;
        pos[at] = l < rows ? l * thin : rows * thin + l - rows;
        run[at] = l * thin / group;
      }
    cuda::DeviceBuffer<uint8_t> K(codes), V(codes);
    cuda::DeviceBuffer<Pair> kp(std::vector<Pair>(size_t(H) * key_groups * hd, Pair::rounded(-0.5f, 0.07f))),
        vp(std::vector<Pair>(size_t(H) * capacity * vg, Pair::rounded(-0.5f, 0.07f)));
    cuda::DeviceBuffer<__half> ring_k(size_t(H) * ring_rows * hd), ring_v(ring_k.size()), out(size_t(H) * hd);
    KVTP_CUDA_CHECK(cudaMemset(ring_k.get(), 0, ring_k.size() * 2));
    KVTP_CUDA_CHECK(cudaMemset(ring_v.get(), 0, ring_v.size() * 2));
    cuda::DeviceBuffer<int> dpos(pos), drun(run), dcounts(counts), dlen(lengths), dqpos(std::vector<int>{p});
    cuda::DeviceBuffer<float> q(random(size_t(H) * hd)), weights(size_t(H) * capacity);
    kivi.K = K.get(), kivi.V = V.get(), kivi.k_params = kp.get(), kivi.v_params = vp.get();
    kivi.ring = {ring_k.get(), ring_v.get(), ring_rows, hd};
    kivi.k_pos = dpos.get(), kivi.capacity = kivi.pos_capacity = capacity;
    kivi.quantized = kivi.quantized_after = dcounts.get(), kivi.key_groups = key_groups;
    kivi.run = thin > 1 ? drun.get() : nullptr;
    const float ms = graphMs([&] {
      cuda::attention<uint8_t, __half>(q.get(), H * hd, dqpos.get(), 1, H, K.get(), V.get(), dpos.get(),
                                       int(capacity), H, hd, 0, 0.088f, out.get(), dlen.get(), capacity,
                                       probs ? weights.get() : nullptr, nullptr, false, &kivi);
    });
    const double bytes = double(H) * (double(rows) * (2 * cb + vg * sizeof(Pair)) +
                                      double(key_groups) * hd * sizeof(Pair) + double(ring_count) * 2 * hd * 2);
    std::printf("  %-60s %7.1f us  %5.2f TB/s\n", what.c_str(), ms * 1e3, bytes / (ms * 1e-3) / 1e12);
  };
  for (int rows : {32768, 6553, 1638, 256})
    kiviAttention("every row coded, " + std::to_string(rows) + " rows a head", rows, 1, false);
  kiviAttention("6553 rows a head thinned from 32768 (each row's run indexed)", 6553, 5, false);
  kiviAttention("the same, with the probabilities (Scissorhands)", 6553, 5, true);
  kiviAttention("every row coded, 6553 rows a head, with the probabilities", 6553, 1, true);
}
}  // namespace

// usage: kvtp_cuda_bench [attention] (attention: the decode attention's fixed costs alone)
int main(int argc, char** argv) {
  if (cuda::deviceCount() == 0) {
    std::printf("kvtp_cuda_bench: no CUDA device, nothing measured\n");
    return 0;
  }
  cudaDeviceProp prop{};
  KVTP_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.0f MB L2\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6);
  if (argc > 1 && std::string(argv[1]) == "attention") {
    attentionFixedCosts();
    return 0;
  }

  const size_t n = size_t(1) << 30;  // 4 GiB of floats copied: far beyond L2
  cuda::DeviceBuffer<float> src(n / 2), dst(n / 2);
  KVTP_CUDA_CHECK(cudaMemset(src.get(), 1, src.size() * 4));
  const float copy_ms = medianMs([&] { KVTP_CUDA_CHECK(cudaMemcpy(dst.get(), src.get(), src.size() * 4, cudaMemcpyDeviceToDevice)); });
  const double bw = 2.0 * src.size() * 4 / (copy_ms * 1e-3) / 1e12;  // read + write
  std::printf("copy: %.2f TB/s (read + write, %.0f MiB)\n", bw, src.size() * 4 / 1048576.0);

  cuda::Blas blas;
  const int m = 8192;
  cuda::DeviceBuffer<float> A(random(size_t(m) * m)), B(random(size_t(m) * m)), C(size_t(m) * m);
  const float gemm_ms = medianMs([&] { cuda::linear(blas, A.get(), m, m, B.get(), m, nullptr, C.get()); }, 5);
  std::printf("sgemm %d^3 (fp32, no TF32): %.1f TFLOP/s\n", m, 2.0 * m * m * m / (gemm_ms * 1e-3) / 1e12);

  std::printf("decode attention (v4: per GQA group, register arrays), 32 heads (8 KV heads), head_dim 128, T = 1:\n");
  for (int L : {2048, 8192, 32768}) {
    const int heads = 32, kv = 8, hd = 128;
    cuda::DeviceBuffer<float> q(random(size_t(heads) * hd)), K(random(size_t(kv) * L * hd)),
        V(random(size_t(kv) * L * hd)), out(size_t(heads) * hd);
    std::vector<int> kp(L);
    for (int i = 0; i < L; ++i) kp[i] = i;
    std::vector<int> qp = {L};
    cuda::DeviceBuffer<int> dkp(kp), dqp(qp);
    const float ms = medianMs([&] {
      cuda::attention(q.get(), heads * hd, dqp.get(), 1, heads, K.get(), V.get(), dkp.get(), L, kv, hd, int64_t(L) * hd,
                      0.088f, out.get());
    });
    const double bytes = 2.0 * kv * L * hd * 4;  // K and V read once: the floor
    std::printf("  L %6d: %8.3f ms  %6.2f TB/s effective  (%.1f%% of the copy bandwidth)\n", L, ms,
                bytes / (ms * 1e-3) / 1e12, 100 * bytes / (ms * 1e-3) / 1e12 / bw);
  }

  attentionFixedCosts();

  // Decode's matrix-vector products at Llama-2-7B's shapes (fp16 weights): the GEMV kernel of
  // forward_ops against cuBLAS, as a share of the copy bandwidth (the weights are read once).
  std::printf("decode GEMV, fp16 weights, Llama-2-7B shapes (out x in):\n");
  for (auto [out, in] : {std::pair{12288, 4096}, {4096, 4096}, {22016, 4096}, {4096, 11008}, {32000, 4096}}) {
    constexpr int kBatch = 8;  // a batched decode step's rows: cuBLAS's product, for the GEMV's bytes
    cuda::DeviceBuffer<__half> W(size_t(out) * in), x(size_t(kBatch) * in);
    KVTP_CUDA_CHECK(cudaMemset(W.get(), 0, W.size() * 2));
    KVTP_CUDA_CHECK(cudaMemset(x.get(), 0, x.size() * 2));
    cuda::DeviceBuffer<float> y(size_t(kBatch) * out);
    const double bytes = double(out) * in * 2;
    auto tbs = [&](float ms) { return bytes / (ms * 1e-3) / 1e12; };
    const float ours = medianMs([&] { cuda::gemm(blas, x.get(), 1, in, W.get(), out, nullptr, y.get(), true); });
    const float cublas = medianMs([&] { cuda::gemmBlas(blas, x.get(), 1, in, W.get(), out, nullptr, y.get(), true); });
    const float cublas8 = medianMs([&] { cuda::gemmBlas(blas, x.get(), kBatch, in, W.get(), out, nullptr, y.get(), true); });
    std::printf("  %5d x %5d: gemv %7.1f us (%4.2f TB/s, %3.0f%% of copy)   cuBLAS %7.1f us (%4.2f TB/s)   "
                "%d rows (cuBLAS) %7.1f us (%4.2f TB/s)\n", out, in, ours * 1e3, tbs(ours), 100 * tbs(ours) / bw,
                cublas * 1e3, tbs(cublas), kBatch, cublas8 * 1e3, tbs(cublas8));
  }

  // A decode step's layers as the engine runs them (Llama-2-7B shapes, fp16, 32 layers of their
  // own weights so nothing stays in L2, one CUDA graph replayed): the weight GEMVs alone, then
  // with the two norm kernels, RoPE + KV append in the Q|K|V epilogue, attention over a 2k cache
  // — where a step's time goes, per layer.
  {
    const int layers = 32, H = 4096, F = 11008, heads = 32, hd = 128, L = 2048, W = 3 * H;
    struct Layer {
      cuda::DeviceBuffer<__half> qkv, o, gate_up, down, K, V;
      cuda::DeviceBuffer<int> pos;
    };
    std::vector<Layer> ls(layers);
    std::vector<int> kpos(size_t(heads) * L);
    for (size_t i = 0; i < kpos.size(); ++i) kpos[i] = int(i % L);
    auto filled = [](size_t n) {
      cuda::DeviceBuffer<__half> b(n);
      KVTP_CUDA_CHECK(cudaMemset(b.get(), 0x11, n * 2));  // small finite halves
      return b;
    };
    for (auto& l : ls) {
      l.qkv = filled(size_t(W) * H), l.o = filled(size_t(H) * H), l.gate_up = filled(size_t(2 * F) * H);
      l.down = filled(size_t(H) * F), l.K = filled(size_t(heads) * L * hd), l.V = filled(size_t(heads) * L * hd);
      l.pos = cuda::DeviceBuffer<int>(kpos);
    }
    std::vector<float> inv(hd / 2);
    for (int i = 0; i < hd / 2; ++i) inv[i] = float(std::pow(10000.0, -2.0 * i / hd));
    cuda::DeviceBuffer<float> x(random(H)), norm_w(random(H)), qkv(W), dinv(inv);
    cuda::DeviceBuffer<__half> xn(F), ctx(H), act(F);
    std::vector<int> meta = {L - 1};
    for (int h = 0; h < heads; ++h) meta.push_back(L - 1);  // slots: the last row of each head
    for (int h = 0; h < heads; ++h) meta.push_back(L);      // lengths after
    cuda::DeviceBuffer<int> dmeta(meta);
    const int* d_pos = dmeta.get();
    cuda::DeviceBuffer<float2> rope(hd / 2);
    cuda::ropeTable(d_pos, 1, hd, dinv.get(), rope.get());
    auto norm = [&] { cuda::rmsNormTo(x.get(), 1, H, norm_w.get(), 1e-5f, xn.get()); };
    auto timeLayers = [&](const char* what, auto&& layer) {
      cuda::GraphReplay graph;
      auto all = [&] { for (auto& l : ls) layer(l); };
      const float ms = medianMs([&] { graph.run(0, all); }, 9);
      std::printf("  %-52s %7.1f us/layer\n", what, ms * 1e3 / layers);
    };
    std::printf("decode layers, Llama-2-7B shapes, fp16, %d layers in one graph:\n", layers);
    auto layer = [&](Layer& l, bool norms, bool rope_append, bool attend) {
      const cuda::KvAppend<__half> append{heads, heads, hd, d_pos, rope.get(), l.K.get(), l.V.get(), l.pos.get(), L, d_pos + 1};
      if (norms) norm();
      if (rope_append) cuda::qkvAppend(blas, xn.get(), 1, H, l.qkv.get(), nullptr, qkv.get(), append);
      else cuda::gemm(blas, xn.get(), 1, H, l.qkv.get(), W, nullptr, qkv.get(), false);
      if (attend)
        cuda::attention(qkv.get(), W, d_pos, 1, heads, l.K.get(), l.V.get(), l.pos.get(), L, heads, hd, int64_t(L) * hd,
                        0.088f, ctx.get(), d_pos + 1 + heads, L);
      cuda::gemm(blas, ctx.get(), 1, H, l.o.get(), H, nullptr, x.get(), true);
      if (norms) norm();
      cuda::gemmActivation(blas, xn.get(), 1, H, l.gate_up.get(), F, nullptr, cuda::Activation::SiluMul, nullptr, act.get());
      cuda::gemm(blas, act.get(), 1, F, l.down.get(), H, nullptr, x.get(), true);
    };
    timeLayers("4 GEMVs (Q|K|V, O, gate|up + SiLU, down)", [&](Layer& l) { layer(l, false, false, false); });
    timeLayers("+ the two norm kernels", [&](Layer& l) { layer(l, true, false, false); });
    timeLayers("+ RoPE + KV append in the Q|K|V epilogue", [&](Layer& l) { layer(l, true, true, false); });
    timeLayers("+ attention over 2048 keys (the engine's layer)", [&](Layer& l) { layer(l, true, true, true); });
    timeLayers("attention over 2048 keys alone", [&](Layer& l) {
      cuda::attention(qkv.get(), W, d_pos, 1, heads, l.K.get(), l.V.get(), l.pos.get(), L, heads, hd, int64_t(L) * hd,
                      0.088f, ctx.get(), d_pos + 1 + heads, L);
    });
  }

  // Prefill attention of 2048 queries over their own 2048 keys, Llama-2-7B's 32 heads of 128, fp16:
  // the tensor-core flash kernel against the cuBLAS path (score GEMMs, softmax, PV GEMM; reached
  // here by asking for every row's probabilities, which adds one small summing kernel a chunk).
  {
    const int T = 2048, heads = 32, hd = 128;
    std::vector<float> qf = random(size_t(T) * heads * hd);
    std::vector<__half> kv(size_t(heads) * T * hd);
    for (size_t i = 0; i < kv.size(); ++i) kv[i] = __float2half(qf[i % qf.size()]);
    std::vector<int> pos(T);
    for (int i = 0; i < T; ++i) pos[i] = i;
    cuda::DeviceBuffer<float> q(qf), observed(size_t(heads) * T);
    cuda::DeviceBuffer<__half> K(kv), V(kv), out(size_t(T) * heads * hd);
    cuda::DeviceBuffer<int> dpos(pos);
    const double flops = 4.0 * double(T) * (T + 1) / 2 * hd * heads;  // QK^T and PV over the visible pairs
    const float flash = medianMs([&] {
      cuda::flashAttention(q.get(), heads * hd, dpos.get(), T, heads, K.get(), V.get(), dpos.get(), T, heads, hd, T,
                           0.088f, out.get());
    });
    const float gemms = medianMs([&] {
      cuda::attentionPrefill(blas, q.get(), heads * hd, dpos.get(), pos.data(), T, heads, K.get(), V.get(), dpos.get(),
                             pos.data(), T, heads, hd, T, 0.088f, out.get(), size_t(1) << 30, observed.get(), 0);
    });
    std::printf("prefill attention, %d tokens, %d heads of %d, fp16: flash %.3f ms (%.0f TFLOP/s)   cuBLAS path %.3f ms (%.0f TFLOP/s)\n",
                T, heads, hd, flash, flops / (flash * 1e-3) / 1e12, gemms, flops / (gemms * 1e-3) / 1e12);
  }
  return 0;
}
