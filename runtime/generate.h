// Generation (`kvtp generate`, the generate job): each prompt through the model at once (its KV
// cache compressed at the prompt's end, as --prefill does), then new tokens one at a time through
// the cache — compressed after every step as in a decode-mode perplexity job — each chosen from
// the last logits, greedily or sampled with a seed, until a stop condition.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "runtime/engine.h"
#include "runtime/tokenizer.h"

namespace kvtp {

struct Sampling {
  double temperature = 0;  // 0: greedy, the most likely token (the lowest id on a tie)
  int top_k = 0;           // keep the k most likely tokens; 0: all
  double top_p = 1;        // keep the fewest most likely tokens whose probabilities sum to p
  uint64_t seed = 0;
  void validate() const;   // throws Error for values out of range
};

// The next token from `vocab` logits, as transformers' warpers order it: temperature, top-k,
// top-p, then the token whose cumulative probability (most likely first) passes `draw` in [0, 1).
int chooseToken(const float* logits, int vocab, const Sampling& s, double draw);
// The uniform draw of a sequence's step: a hash of (seed, sequence, step), so that every rank and
// every batch size draws the same.
double samplingDraw(uint64_t seed, int sequence, int step);

struct StopRule {
  int max_new_tokens = 64;
  std::vector<int> eos;           // ids that end a sequence (kept as its last new id)
  std::vector<std::string> stop;  // strings that end it (the text ends before the string)
};

struct Generated {
  std::vector<int> prompt;  // the prompt's ids
  std::vector<int> ids;     // the new ids
  std::string text;         // the new ids' text (empty without a tokenizer)
  std::string finish;       // "length", "eos", "stop", or "context" (the model's positions ran out)
};

// Called for each new token of sequence `sequence` with the text it adds to what was streamed
// (empty while it may be the start of a stop string or ends inside a UTF-8 character).
using TokenFn = std::function<void(int sequence, int id, const std::string& text)>;

struct GenerateStats {
  int64_t new_tokens = 0;
  double seconds = 0;
  // This rank, as a perplexity job counts them: the most the cache held (a prompt before its
  // compression), the uncompressed cache of the longest sequence, and the most held between steps.
  int64_t kv_bytes_peak = 0, kv_bytes_full = 0, kv_bytes_steady = 0;
};

// Generates for every prompt (each at least one token, shorter than the model's context), up to
// `batch` at once (Engine::decodeBatchLogits; a batch never runs past the context, so results do
// not depend on it). `tokenizer` may be null (ids only; stop strings need one).
std::vector<Generated> generate(Engine& engine, int max_positions, const Tokenizer* tokenizer,
                                const std::vector<std::vector<int>>& prompts, const Sampling& sampling,
                                const StopRule& stop, int batch = 1, const TokenFn& on_token = {},
                                GenerateStats* stats = nullptr);

}  // namespace kvtp
