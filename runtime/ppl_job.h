// A perplexity job as one value: what `kvtp ppl` parses from its options and, later, what the
// coordinator sends to workers. runPplJob does the whole thing: load, tokenize, window, score.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "runtime/perplexity.h"

namespace kvtp {

struct PplJob {
  std::string model_dir;         // a Hugging Face folder, or
  std::string synthetic;         // a preset name / config.json for random weights (--input-ids only)
  uint64_t seed = 0;             // synthetic weights' seed
  int layers = 0;                // synthetic: override num_hidden_layers (0 = the config's)
  std::string data;              // C4-style documents, or
  std::string input_ids;         // lines of token ids
  int seq_len = 2048;            // capped at the model's max positions
  int stride = 0;                // 0: non-overlapping windows
  int max_windows = 0;           // 0: all
  size_t max_docs = 0;           // 0: all
  std::string join = "\n\n";     // between documents
  bool drop_partial = false;     // drop a last window shorter than seq_len
  Mode mode = Mode::Prefill;
  std::string kv;                // KV eviction spec (docs/KV.md); implies decode mode
  std::string kv_quant;          // KV quantization spec; implies decode mode
  std::string kv_lowrank;        // KV low-rank channels spec (cskv:rank=R,window=W); implies decode mode
  int prefill = 0;               // decode mode: tokens per window that go through at once first
  int batch = 1;                 // decode mode, cuda: windows decoded together (a token each per step)
  std::string device = "cpu";    // cpu | cuda
  std::string dtype;             // fp32 | fp16 | bf16; empty: fp32 on cpu, fp16 on cuda
  bool time_collectives = false;  // cuda, tp > 1: measure collective_seconds (CUDA events; slows decode)
  std::string resolvedDtype() const { return !dtype.empty() ? dtype : device == "cuda" ? "fp16" : "fp32"; }
};

// Named evaluation protocols (docs/PERPLEXITY.md): "default", "gptq".
void applyPreset(PplJob& job, const std::string& preset);

struct PplJobResult {
  PplResult result;
  std::string model;
  int seq_len = 0;
  int windows = 0;
  int tp = 1, dp = 1;
  int64_t weight_bytes = 0;   // this rank's, as stored on its device
  int64_t kv_plan_bytes = 0;  // this rank's float32 full cache for the longest window (memory plan)
  std::string kv;             // the policy, as parsed
  std::vector<int64_t> kv_bytes_peak, kv_bytes_full, kv_bytes_steady;  // per rank of the group (docs/KV.md)
  std::vector<int64_t> device_bytes_peak;  // per rank: GPU memory its buffers held at most (0 on cpu)
  std::vector<double> collective_seconds;  // per rank: GPU time inside tensor-parallel collectives (cuda)
};

// Called once the model is loaded, before scoring: a one-line memory plan for the log.
using PlanFn = std::function<void(const std::string&)>;

// Runs the job on every rank of `topology` (null: this process alone). Each tensor-parallel
// group scores every dp-th window; all ranks return the whole result. Throws on bad input
// (each rank for itself: the caller ends the job, see comm::abortJob).
PplJobResult runPplJob(const PplJob& job, const comm::Topology* topology = nullptr, const ProgressFn& progress = {},
                       const PlanFn& plan = {});

// The `kvtp ppl --json` object: ppl, nll, tokens, sequences[{ppl, tokens}], seconds,
// tokens_per_second, plus model, mode, seq_len, stride, windows.
nlohmann::json toJson(const PplJob& job, const PplJobResult& r);

}  // namespace kvtp
