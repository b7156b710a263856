// A generation job as one value: what `kvtp generate` parses and what the coordinator sends to
// workers. runGenerateJob does the whole thing: load, tokenize the prompts, generate.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "runtime/generate.h"

namespace kvtp {

struct GenerateJob {
  std::string model_dir;             // a Hugging Face folder, or
  std::string synthetic;             // a preset for random weights (prompts as ids only)
  uint64_t seed = 0;                 // synthetic weights' seed
  int layers = 0;                    // synthetic: override num_hidden_layers
  std::vector<std::string> prompts;  // texts, each a prompt; and/or
  std::string prompts_file;          // documents (C4-style JSON lines, "text" each), each a prompt; or
  std::string input_ids;             // lines of token ids, each a prompt
  int max_new_tokens = 64;
  Sampling sampling;
  std::vector<std::string> stop;     // stop strings
  bool ignore_eos = false;           // run to max_new_tokens even past the model's EOS
  std::string kv, kv_quant, kv_lowrank;  // as for a perplexity job (docs/KV.md)
  int batch = 1;                     // cuda: prompts generated together
  std::string device = "cpu";
  std::string dtype;                 // empty: fp32 on cpu, fp16 on cuda
  std::string resolvedDtype() const { return !dtype.empty() ? dtype : device == "cuda" ? "fp16" : "fp32"; }
};

struct GenerateJobResult {
  std::vector<Generated> sequences;  // in prompt order
  std::string model, kv;
  int tp = 1;
  double seconds = 0;
  int64_t new_tokens = 0;
  int64_t kv_bytes_peak = 0, kv_bytes_full = 0, kv_bytes_steady = 0;  // summed over the group's ranks
};

struct JobModel;

// Runs the job on every rank of `topology` (null: this process alone), the tensor-parallel group
// being the whole world (data parallel has nothing to split); every rank returns the whole
// result, and `on_token` is called on every rank. `model`, when given, keeps the model between
// jobs of the same model, device and prompts (several compressions of one prompt set: kvtp
// passkey --specs): opened into it by the first, used as it is by the next.
GenerateJobResult runGenerateJob(const GenerateJob& job, const comm::Topology* topology = nullptr,
                                 const TokenFn& on_token = {}, JobModel* model = nullptr);

// The result as `kvtp generate --json` ends it: {"sequences": [{prompt_tokens, ids, text, finish}],
// new_tokens, seconds, tokens_per_second, model, kv, tp, device, dtype, kv_bytes_peak, kv_bytes_full,
// kv_ratio, kv_bytes_steady, kv_steady_ratio}.
nlohmann::json toJson(const GenerateJob& job, const GenerateJobResult& r);

}  // namespace kvtp
