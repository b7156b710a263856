// kvtp bench: CPU forward-pass throughput beside the sgemm rate of the same BLAS, measured in
// the same run, so the ratio says how much of the machine the forward pass uses; with
// --device cuda, prefill throughput and decode ms/token at several contexts beside the HBM
// bandwidth floor (weights + KV bytes a decode step must read, at the device's peak bandwidth), at
// batch 1 and 8 (--batch), and generation tokens/s at those batches (kvtp generate's loop);
// --compare-hf runs transformers on the same shapes in the same run (scripts/hf_bench.py) and
// prints the ratios.
#include <cblas.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>

#include "launcher/commands.h"
#include "runtime/error.h"
#include "runtime/generate.h"
#include "runtime/gpu_engine.h"
#include "runtime/model.h"
#include "runtime/presets.h"
#include "runtime/query_filters.h"

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

struct BenchArgs {
  std::vector<std::string> models, synthetic;
  int seq_len = 2048, repeats = 3, layers = 0, decode_steps = 32;
  std::vector<int> contexts = {2048, 8192, 32768}, batches = {1, 8};
  std::string device = "cpu", dtype = "fp16", kv, kv_quant, kv_lowrank;
  bool json = false, compare_hf = false, decide_phases = false;
};

// The models to measure: name, config, and where their weights come from.
struct BenchModel {
  std::string name;
  std::string directory;  // empty: synthetic
  ModelConfig config;
  WeightSource weights;
};

std::vector<BenchModel> benchModels(const BenchArgs& a) {
  std::vector<BenchModel> models;
  for (auto& m : a.models) {
    const ModelConfig c = loadConfig(m);
    models.push_back({m, m, c, checkpointSource(c, Partition::make(c, 0, 1), m)});
  }
  for (auto& s : a.synthetic) {
    ModelConfig c = syntheticConfig(s);
    if (a.layers > 0) c.layers = a.layers;
    // RoPE has no position table: a synthetic Llama may run past its config's context length
    // (the bandwidth and FLOPs of a step do not depend on it).
    if (c.family == Family::Llama && !a.contexts.empty())
      c.max_positions = std::max(c.max_positions, *std::max_element(a.contexts.begin(), a.contexts.end()) + a.decode_steps + 1);
    models.push_back({"synthetic:" + s, "", c, syntheticSource(c, Partition::make(c, 0, 1), 0)});
  }
  return models;
}

// Useful matrix FLOPs of a prefill of T tokens: weights (2 per parameter per token) + causal
// attention, QK^T and PV over the T(T+1)/2 visible query-key pairs (masked work not counted).
double prefillFlops(const ModelConfig& c, int T) {
  return 2.0 * double(c.matmulParameterCount()) * T + 4.0 * double(T) * (T + 1) / 2 * c.heads * c.head_dim * c.layers;
}

// scripts/hf_bench.py beside this binary (build/kvtp, .bundle/kvtp: ../scripts), else under the
// working directory; empty if neither has it.
std::string hfBenchScript() {
  std::vector<std::filesystem::path> places = {"scripts/hf_bench.py"};
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) places.insert(places.begin(), exe.parent_path().parent_path() / "scripts/hf_bench.py");
  for (const auto& p : places)
    if (std::filesystem::exists(p)) return p.string();
  return "";
}

// transformers on a synthetic preset's shape, same dtype, window and contexts (batch 1): the
// script's JSON line, or {"error": why} (no python3, no transformers, a shape it lacks).
nlohmann::json runHfBench(const BenchArgs& a, const std::string& preset, int seq_len) {
  const std::string script = hfBenchScript();
  if (script.empty()) return {{"error", "scripts/hf_bench.py not found beside the binary or here"}};
  if (a.dtype == "fp32") return {{"error", "scripts/hf_bench.py measures fp16 or bf16"}};
  std::string contexts;
  for (int c : a.contexts) contexts += (contexts.empty() ? "" : ",") + std::to_string(c);
  const std::string cmd = "python3 '" + script + "' --model " + preset + " --dtype " + a.dtype + " --seq-len " +
                          std::to_string(seq_len) + " --contexts '" + contexts + "' --decode-steps " +
                          std::to_string(a.decode_steps) + " --repeats " + std::to_string(a.repeats) +
                          (a.layers > 0 ? " --layers " + std::to_string(a.layers) : "") + " 2>&1";
  std::string output;
  if (FILE* pipe = popen(cmd.c_str(), "r")) {
    std::array<char, 4096> buf;
    while (size_t n = std::fread(buf.data(), 1, buf.size(), pipe)) output.append(buf.data(), n);
    pclose(pipe);
  }
  // The last line that is a JSON object is the result; otherwise the output's end says why.
  std::vector<std::string> lines;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  for (auto it = lines.rbegin(); it != lines.rend(); ++it)
    if (it->starts_with("{")) {
      auto j = nlohmann::json::parse(*it, nullptr, false);
      if (!j.is_discarded()) return j;
    }
  const std::string tail = output.size() > 600 ? output.substr(output.size() - 600) : output;
  return {{"error", "transformers did not run: " + tail}};
}

// The peer's numbers beside kvtp's: prefill tokens/s and batch-1 decode ms/token at each context.
void compareWithHf(const nlohmann::json& hf, nlohmann::json& m, bool quiet) {
  m["transformers"] = hf;
  if (hf.contains("error")) {
    if (!quiet) std::printf("transformers: %s\n", hf["error"].get<std::string>().c_str());
    return;
  }
  const double ours = m["prefill"]["tokens_per_second"], theirs = hf["prefill"]["tokens_per_second"];
  m["prefill"]["hf_tokens_per_second"] = theirs;
  m["prefill"]["ratio_to_hf"] = ours / theirs;
  if (!quiet)
    std::printf("transformers %s (%s, %s): prefill %9.0f tok/s — kvtp %.2fx\n", hf["transformers"].get<std::string>().c_str(),
                hf["attn"].get<std::string>().c_str(), hf["gpu"].get<std::string>().c_str(), theirs, ours / theirs);
  for (auto& d : m["decode"]) {
    if (d["batch"] != 1) continue;
    for (const auto& h : hf["decode"])
      if (h["context"] == d["context"]) {
        const double ms = h["ms_per_token"];
        d["hf_ms_per_token"] = ms;
        d["ratio_to_hf"] = ms / d["ms_per_token"].get<double>();
        if (!quiet)
          std::printf("transformers decode at %5d, batch 1: %7.3f ms/token — kvtp %.2fx\n", d["context"].get<int>(), ms,
                      d["ratio_to_hf"].get<double>());
      }
  }
}

void benchGpu(const BenchArgs& a) {
  const Precision dtype = parsePrecision(a.dtype);
  const int device = localDevice(), elem = dtype == Precision::F32 ? 4 : 2;
  const double peak = peakMemoryBandwidth(device);
  nlohmann::json out = {{"device", "cuda"}, {"dtype", a.dtype}, {"peak_bandwidth_gbs", peak / 1e9},
                        {"models", nlohmann::json::array()}};
  if (!a.json) std::printf("cuda device %d, %s, peak memory bandwidth %.0f GB/s\n", device, a.dtype.c_str(), peak / 1e9);
  for (auto& [name, directory, c, weights] : benchModels(a)) {
    const Partition whole = Partition::make(c, 0, 1);
    const double weight_bytes = double(weightElements(c, whole)) * elem;
    const kv::PolicySpec spec = kv::parsePolicy(a.kv, a.kv_quant, a.kv_lowrank);  // a bad spec: main prints its message
    GpuOptions options{dtype, device, nullptr, spec, nullptr, queryFiltersFor(spec, directory, c, whole)};
    options.time_decision_phases = a.decide_phases;
    auto engine = makeGpuEngine(c, whole, weights, options);
    std::mt19937 rng(2);
    auto randomTokens = [&](int n) {
      std::vector<int> t(n);
      for (auto& x : t) x = int(rng() % c.vocab_size);
      return t;
    };
    std::vector<int> pos(size_t(c.max_positions));
    std::iota(pos.begin(), pos.end(), 0);
    nlohmann::json m = {{"model", name}, {"weight_bytes", weight_bytes}};
    // Prefill: a window scored whole (the perplexity job's step), head included.
    const int T = std::min(a.seq_len, c.max_positions);
    const auto tokens = randomTokens(T + 1);
    const double s = medianSeconds(a.repeats, [&] {
      engine->startWindow();
      engine->step(tokens.data(), pos.data(), T, 0, T, tokens.data() + 1);
    });
    const double tflops = prefillFlops(c, T) / s / 1e12;
    m["prefill"] = {{"seq_len", T}, {"seconds", s}, {"tokens_per_second", T / s}, {"tflops", tflops}};
    if (!a.json)
      std::printf("%-24s prefill %5d tokens: %8.2f ms  %9.0f tok/s  %6.1f TFLOP/s\n", name.c_str(), T, 1e3 * s, T / s,
                  tflops);
    // Decode: each of `batch` sequences holds a context of C tokens (its own), then every step
    // decodes one token of each at once, its log-prob scored; the step's time is each sequence's
    // time per token.
    m["decode"] = nlohmann::json::array();
    m["skipped"] = nlohmann::json::array();
    for (int C : a.contexts) {
      if (C + a.decode_steps >= c.max_positions) {
        if (!a.json) std::printf("%-24s decode at %d: skipped (max_position_embeddings %d)\n", name.c_str(), C, c.max_positions);
        continue;
      }
      auto skip = [&](int B, const std::exception& e) {
        m["skipped"].push_back({{"context", C}, {"batch", B}, {"reason", e.what()}});
        if (!a.json) std::printf("%-24s decode at %5d, batch %d: skipped (%s)\n", name.c_str(), C, B, e.what());
      };
      for (int B : a.batches) {
        try {
          engine->reserve(B, C + a.decode_steps);
        } catch (const std::runtime_error& e) {  // the device cannot hold this batch's cache (Error, or a cudaMalloc's)
          skip(B, e);
          continue;
        }
        std::vector<std::vector<int>> ctx(B);
        std::vector<int> tokens(B), positions(B), targets(B);
        // A step's time, and the share its compression decision took (the log-probs reach the host
        // before compress() starts, so the two do not overlap).
        std::vector<double> times, decide_times;
        std::vector<std::pair<std::string, double>> phases_before;
        double prompt_decide = 0;  // the first sequence's prompt decision (SnapKV's, say), the prefill apart
        // A prompt's rows may need more room than the cache (KIVI under eviction holds them at full
        // precision), its prefill's activations more than the device has left beside the batch's
        // cache, and the kept rows more as they grow: each skips this batch with the reason (a CUDA
        // allocation's own error).
        try {
          for (int b = 0; b < B; ++b) {
            ctx[b] = randomTokens(C + a.decode_steps + 1);
            engine->useSequence(b);
            engine->startWindow();
            engine->step(ctx[b].data(), pos.data(), C, 0, 0, nullptr);
            engine->synchronize();
            const auto t0 = std::chrono::steady_clock::now();
            engine->compress(C - 1, true);  // --kv: the context is the prompt (snapkv compresses it at its end)
            engine->synchronize();
            if (b == 0) prompt_decide = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          }
          phases_before = engine->decisionPhaseSeconds();
          for (int i = C; i < C + a.decode_steps; ++i) {
            for (int b = 0; b < B; ++b) tokens[b] = ctx[b][i], positions[b] = i, targets[b] = ctx[b][i + 1];
            const auto t0 = std::chrono::steady_clock::now();
            engine->decodeBatch(tokens.data(), positions.data(), targets.data());
            const auto t1 = std::chrono::steady_clock::now();
            engine->compressBatch(positions);
            engine->synchronize();
            const auto t2 = std::chrono::steady_clock::now();
            times.push_back(std::chrono::duration<double>(t2 - t0).count());
            decide_times.push_back(std::chrono::duration<double>(t2 - t1).count());
          }
        } catch (const std::runtime_error& e) {
          skip(B, e);
          continue;
        }
        auto median = [](std::vector<double>& v) {
          std::sort(v.begin(), v.end());
          return v[v.size() / 2];
        };
        // The mean beside the median: with `interval=N` most steps skip the decision, so the median
        // step leaves it out and the mean is what a token costs.
        auto mean = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); };
        const double step = median(times), decide = median(decide_times), step_mean = mean(times),
                     decide_mean = mean(decide_times);
        // The KV bytes one step reads: what the caches hold mid-run (counted at 2 bytes a value).
        double kv_bytes = 0;
        for (int b = 0; b < B; ++b) {
          engine->useSequence(b);
          kv_bytes += double(engine->kvBytes(C + a.decode_steps / 2).stored) * elem / 2;
        }
        const double floor = (weight_bytes + kv_bytes) / peak;
        m["decode"].push_back({{"context", C}, {"batch", B}, {"kv", spec.describe()}, {"kv_bytes", kv_bytes},
                               {"ms_per_token", 1e3 * step}, {"decide_ms", 1e3 * decide},
                               {"ms_per_token_mean", 1e3 * step_mean}, {"decide_ms_mean", 1e3 * decide_mean},
                               {"prompt_decide_ms", 1e3 * prompt_decide},
                               {"tokens_per_second", B / step},
                               {"floor_ms", 1e3 * floor}, {"ratio_to_floor", floor / step},
                               {"achieved_gbs", (weight_bytes + kv_bytes) / step / 1e9},
                               {"device_bytes", deviceBytesHeld()}});
        if (!a.json)
          std::printf("%-24s decode at %5d, batch %d: %7.3f ms/token (median of %d, mean %.3f; deciding %.3f, mean "
                      "%.3f; the prompt's %.1f)  %7.0f tok/s  KV %8.1f MiB  floor %7.3f ms  %5.1f%% of peak bandwidth\n",
                      name.c_str(), C, B, 1e3 * step, a.decode_steps, 1e3 * step_mean, 1e3 * decide, 1e3 * decide_mean,
                      1e3 * prompt_decide, B / step, kv_bytes / (1 << 20), 1e3 * floor, 100 * floor / step);
        engine->useSequence(0);
        if (const std::vector<int> rows = engine->headRows(); !rows.empty()) {
          // How unequal the heads' rows are under a shared budget (each head of a layer gets the same
          // blocks): the first sequence's mean and longest, and max / mean per layer, averaged.
          const size_t heads = rows.size() / c.layers;
          const int longest = *std::max_element(rows.begin(), rows.end());
          double total = 0, imbalance = 0;
          for (size_t l = 0; l < size_t(c.layers); ++l) {
            const auto first = rows.begin() + l * heads, last = first + heads;
            const double sum = std::accumulate(first, last, 0.0);
            total += sum;
            imbalance += sum > 0 ? *std::max_element(first, last) * double(heads) / sum : 1.0;
          }
          const double mean = total / rows.size(), max_over_mean = imbalance / c.layers;
          m["decode"].back()["head_rows"] = {
              {"mean", mean}, {"max", longest}, {"max_over_mean_in_a_layer", max_over_mean}};
          if (!a.json)
            std::printf("    the heads' rows: mean %.0f, max %d, a layer's max / mean %.2f\n", mean, longest,
                        max_over_mean);
        }
        if (a.decide_phases) {  // each phase's mean over the timed steps (every sequence's decisions)
          nlohmann::json phases = nlohmann::json::object();
          for (const auto& [phase, seconds] : engine->decisionPhaseSeconds()) {
            double before = 0;
            for (const auto& [p, s] : phases_before)
              if (p == phase) before = s;
            const double ms = 1e3 * (seconds - before) / a.decode_steps;
            phases[phase] = ms;
            if (!a.json) std::printf("    deciding, %-8s %7.3f ms a step\n", phase.c_str(), ms);
          }
          m["decode"].back()["decide_phases_ms"] = phases;
        }
      }
    }
    // Generation (kvtp generate): B prompts of 128 tokens, greedy, 4 x decode-steps new tokens
    // each, batch B; the time includes the prompts' prefill and choosing each token on the host.
    m["generate"] = nlohmann::json::array();
    for (int B : a.batches) {
      const int prompt = std::min(128, c.max_positions / 2), new_tokens = std::min(4 * a.decode_steps, c.max_positions / 2);
      std::vector<std::vector<int>> prompts(static_cast<size_t>(B));
      for (auto& p : prompts) p = randomTokens(prompt);
      StopRule stop;
      stop.max_new_tokens = new_tokens;
      GenerateStats stats;
      try {
        generate(*engine, c.max_positions, nullptr, prompts, {}, stop, B, {}, &stats);
      } catch (const Error& e) {
        m["skipped"].push_back({{"generate_batch", B}, {"reason", e.what()}});
        continue;
      }
      const double rate = double(stats.new_tokens) / stats.seconds;
      m["generate"].push_back({{"batch", B}, {"prompt_tokens", prompt}, {"new_tokens", stats.new_tokens},
                               {"seconds", stats.seconds}, {"tokens_per_second", rate}});
      if (!a.json)
        std::printf("%-24s generate, batch %d: %d-token prompts, %d new tokens each: %7.0f tok/s (%.2f s)\n",
                    name.c_str(), B, prompt, new_tokens, rate, stats.seconds);
    }
    if (a.compare_hf) {
      if (name.starts_with("synthetic:")) compareWithHf(runHfBench(a, name.substr(10), T), m, a.json);
      else if (!a.json) std::printf("transformers: --compare-hf measures --synthetic presets only\n");
    }
    out["models"].push_back(m);
  }
  if (a.json) std::cout << out.dump() << std::endl;
}

}  // namespace

void addBenchCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "prefill throughput vs the sgemm rate (cpu); prefill and decode vs the HBM floor (cuda)");
  auto a = std::make_shared<BenchArgs>();
  cmd->add_option("--model", a->models, "Hugging Face model folder(s)");
  cmd->add_option("--synthetic", a->synthetic, "preset shape(s) with random weights, e.g. opt-125m");
  cmd->add_option("--seq-len", a->seq_len, "prefill window length (capped at max positions)");
  cmd->add_option("--repeats", a->repeats, "timed repeats; the median is reported")->check(CLI::PositiveNumber);
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->add_option("--device", a->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", a->dtype, "cuda: fp16, bf16 or fp32")->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  cmd->add_option("--contexts", a->contexts, "cuda: decode context lengths")->delimiter(',');
  cmd->add_option("--batch", a->batches, "cuda: decode batch sizes (sequences decoded together)")
      ->delimiter(',')
      ->check(CLI::Range(1, 256));
  cmd->add_option("--decode-steps", a->decode_steps, "cuda: timed decode steps per context (median reported)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--kv", a->kv,
                  "cuda: compress the cache — the prompt-once methods (snapkv, pyramidkv) each context at its end, "
                  "the others every step — e.g. snapkv:budget=0.2 (docs/KV.md)");
  cmd->add_option("--kv-quant", a->kv_quant,
                  "cuda: store the cache quantized: int8 | kivi:bits=2,group=32,residual=128 (docs/KV.md)");
  cmd->add_option("--kv-lowrank", a->kv_lowrank, "cuda: low-rank KV channels: cskv:rank=R,window=W (docs/KV.md)");
  cmd->add_option("--layers", a->layers, "synthetic: override the number of layers (0 = the preset's)");
  cmd->add_flag("--decide-phases", a->decide_phases,
                "cuda: time each phase of a step's compression decision (decide_phases_ms; the device is waited "
                "for at every phase's end, so the step runs slower)");
  cmd->add_flag("--compare-hf", a->compare_hf,
                "cuda: run transformers on the same synthetic shapes in this run (scripts/hf_bench.py) and print "
                "the ratios");
  cmd->callback([a] {
    if (a->device == "cuda") {
      if (a->models.empty() && a->synthetic.empty()) a->synthetic = {"llama-2-7b"};
      return benchGpu(*a);
    }
    if (a->models.empty() && a->synthetic.empty()) {
      a->models = {"models/kvtp-llama-2m"};
      a->synthetic = {"opt-125m"};
    }
    const double gemm = sgemmGflops(2048, a->repeats);
    nlohmann::json out = {{"sgemm_gflops", gemm}, {"sgemm_shape", "2048x2048x2048"}, {"models", nlohmann::json::array()}};
    if (!a->json) std::printf("sgemm 2048^3: %.1f GFLOP/s (median of %d)\n", gemm, a->repeats);

    for (auto& [name, directory, config, weights] : benchModels(*a)) {
      const auto model = std::make_unique<Model>(config, weights({}));
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
      const double gflops = prefillFlops(c, T) / s / 1e9;
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
