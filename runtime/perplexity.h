// The perplexity job (docs/PERPLEXITY.md): token windows scored by a model, in prefill mode
// (a window at once) or decode mode (token by token through the KV cache).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace kvtp {

enum class Mode { Prefill, Decode };
Mode parseMode(const std::string& s);
const char* modeName(Mode m);

// A window of token ids scored from its first token: ids[i] for i >= score_from (>= 1) are
// predicted from ids[0..i-1]. `sequence` groups windows for reporting (an input line).
struct Window {
  int sequence = 0;
  std::vector<int> ids;
  int score_from = 1;
  int64_t scored() const { return int64_t(ids.size()) - score_from; }
};

// Non-overlapping windows of seq_len (stride 0 or >= seq_len), or sliding windows that advance
// by `stride` and score only tokens no earlier window scored (Hugging Face's perplexity recipe).
// A last window shorter than seq_len is kept unless drop_partial; windows of < 2 tokens never.
std::vector<Window> planWindows(const std::vector<int>& ids, int seq_len, int stride, bool drop_partial,
                                int sequence = 0);

struct SequenceResult {
  double nll = 0;  // summed, nats
  int64_t tokens = 0;
  std::vector<double> logprobs;  // natural log of each scored next token, in order
  double ppl() const;
};

struct PplResult {
  double nll = 0;
  int64_t tokens = 0;
  std::vector<SequenceResult> sequences;
  double seconds = 0;
  int64_t kv_bytes_peak = 0;  // this rank: the most the KV cache held (docs/KV.md accounting)
  int64_t kv_bytes_full = 0;  // this rank: the uncompressed cache of the longest window
  int64_t kv_bytes_steady = 0;  // this rank: the most the cache held between steps, after compression
  double ppl() const;
  double tokensPerSecond() const { return seconds > 0 ? tokens / seconds : 0; }
};

struct Progress {
  int windows_done = 0, windows_total = 0;
  int64_t tokens_done = 0, tokens_total = 0;
  double nll = 0;  // so far
  double seconds = 0;
};
using ProgressFn = std::function<void(const Progress&)>;

// Scores every window with `engine`; calls `progress` after each window (and every 64 tokens in
// decode mode). Decode mode feeds the first `prefill` tokens of each window at once (full
// attention), the rest one at a time, letting the engine's KV policy compress after each step;
// with batch > 1, up to `batch` windows of the same shape decode together (Engine::decodeBatch:
// the same log-probs, the engine's throughput at that batch).
PplResult scoreWindows(Engine& engine, const std::vector<Window>& windows, int sequences, Mode mode,
                       const ProgressFn& progress = {}, int prefill = 0, int batch = 1);

}  // namespace kvtp
