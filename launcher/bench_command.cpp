// kvtp bench: CPU forward-pass throughput beside the sgemm rate of the same BLAS, measured in
// the same run, so the ratio says how much of the machine the forward pass uses.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <random>

#include "launcher/commands.h"
#include "runtime/model.h"
#include "runtime/presets.h"

namespace kvtp::launcher {
namespace {

template <class F>
double medianSeconds(int repeats, F&& f) {
  f();  // warm-up: page faults, BLAS thread start
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double sgemmGflops(int n, int repeats) {
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  for (auto* v : {&a, &b})
    for (auto& x : *v) x = d(rng);
  const double s = medianSeconds(repeats, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  });
  return 2.0 * n * n * n / s / 1e9;
}

}  // namespace

void addBenchCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "CPU prefill throughput vs the BLAS sgemm rate");
  struct Args {
    std::vector<std::string> models, synthetic;
    int seq_len = 2048, repeats = 3;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->models, "Hugging Face model folder(s)");
  cmd->add_option("--synthetic", a->synthetic, "preset shape(s) with random weights, e.g. opt-125m");
  cmd->add_option("--seq-len", a->seq_len, "prefill window length (capped at max positions)");
  cmd->add_option("--repeats", a->repeats, "timed repeats; the median is reported")->check(CLI::PositiveNumber);
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->callback([a] {
    if (a->models.empty() && a->synthetic.empty()) {
      a->models = {"models/kvtp-llama-2m"};
      a->synthetic = {"opt-125m"};
    }
    const double gemm = sgemmGflops(2048, a->repeats);
    nlohmann::json out = {{"sgemm_gflops", gemm}, {"sgemm_shape", "2048x2048x2048"}, {"models", nlohmann::json::array()}};
    if (!a->json) std::printf("sgemm 2048^3: %.1f GFLOP/s (median of %d)\n", gemm, a->repeats);

    std::vector<std::pair<std::string, std::unique_ptr<Model>>> models;
    for (auto& m : a->models) models.emplace_back(m, Model::load(m));
    for (auto& s : a->synthetic) {
      ModelConfig c = syntheticConfig(s);
      models.emplace_back("synthetic:" + s, Model::synthetic(c, 0));
    }
    for (auto& [name, model] : models) {
      const auto& c = model->config();
      const int T = std::min(a->seq_len, c.max_positions);
      std::vector<int> tokens(T), pos(T);
      std::mt19937 rng(2);
      for (auto& t : tokens) t = int(rng() % c.vocab_size);
      std::iota(pos.begin(), pos.end(), 0);
      auto cache = model->newCache();
      const double s = medianSeconds(a->repeats, [&] {
        cache.clear();
        auto h = model->forward(tokens.data(), pos.data(), T, cache);
        model->logprobs(h, tokens.data(), T);  // the head is part of scoring
      });
      // Useful matrix FLOPs: weights (2 per parameter per token) + causal attention, QK^T and PV
      // over the T(T+1)/2 visible query-key pairs (masked work the kernel may do is not counted).
      const double flops = 2.0 * double(c.matmulParameterCount()) * T +
                           4.0 * double(T) * (T + 1) / 2 * c.heads * c.head_dim * c.layers;
      const double gflops = flops / s / 1e9;
      out["models"].push_back({{"model", name}, {"seq_len", T}, {"seconds", s}, {"tokens_per_second", T / s},
                               {"gflops", gflops}, {"ratio_to_sgemm", gflops / gemm}});
      if (!a->json)
        std::printf("%-28s seq %5d  %8.3f s  %9.0f tok/s  %6.1f GFLOP/s  %.0f%% of sgemm\n", name.c_str(), T, s,
                    T / s, gflops, 100 * gflops / gemm);
    }
    if (a->json) std::cout << out.dump() << std::endl;
  });
}

}  // namespace kvtp::launcher
