// An engine is one model with its KV cache on one device: what the perplexity job (and the
// benchmarks) drive, whatever the backend. The CPU engine wraps Model + kv::KVCache + kv::Policy;
// the CUDA engine (runtime/gpu_engine.h) keeps weights and cache in GPU memory.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kv/policy.h"
#include "runtime/model.h"

namespace kvtp {

class Engine {
 public:
  virtual ~Engine() = default;
  // A new window (sequence): the KV cache empties.
  virtual void startWindow() = 0;
  // Runs T new tokens at `positions` (ascending, after everything cached) through the model,
  // appending them to the cache, and returns log p(targets[i] | prefix) from hidden rows
  // from .. from + count - 1 (count may be 0).
  virtual std::vector<double> step(const int* tokens, const int* positions, int T, int from, int count,
                                   const int* targets) = 0;
  // After a step that fed tokens up to absolute position `last_pos` (`prefill`: the prompt of a
  // decode-mode window), the KV policy compresses the cache.
  virtual void compress(int last_pos, bool prefill) = 0;
  // Whether compress() can change the cache; if not, it is the full one, counted once per window.
  virtual bool compresses() const = 0;
  // KV bytes of the cache now (docs/KV.md accounting) and of an uncompressed one, this rank.
  virtual kv::KvBytes kvBytes(int tokens_seen) const = 0;
  // Batched decoding. An engine holds `batch` sequences side by side (1 at first); startWindow,
  // step, compress and kvBytes act on the one chosen by useSequence. reserve lays the cache out
  // for `batch` sequences of up to `tokens` cached tokens each (more tokens still grow it as they
  // come; a new batch size empties every sequence) and throws Error, changing nothing, when the
  // device cannot hold them. The CPU engine holds one sequence and grows by the entry.
  virtual void reserve(int batch, int tokens);
  virtual void useSequence(int s);
  // One new token for each of the batch's sequences at once (tokens, positions, targets: one per
  // sequence, in order), appended to each one's cache; returns log p(target) per sequence. Each
  // sequence is compressed afterwards: all at once (compressBatch) or each on its own (useSequence,
  // compress).
  virtual std::vector<double> decodeBatch(const int* tokens, const int* positions, const int* targets) {
    return step(tokens, positions, 1, 0, 1, targets);
  }
  // After decodeBatch: compress(last_positions[s], false) for each sequence s, decided together
  // where the engine can (the CUDA engine's per-step methods: one select over the whole batch).
  virtual void compressBatch(const std::vector<int>& last_positions) {
    for (size_t s = 0; s < last_positions.size(); ++s) {
      useSequence(int(s));
      compress(last_positions[s], false);
    }
  }
  // Generation: runs T new tokens as step() does and returns the logits of the last one over the
  // whole vocabulary (vocab_size floats, float32), the same on every rank of the group.
  virtual std::vector<float> stepLogits(const int* tokens, const int* positions, int T) = 0;
  // One new token for each of the batch's sequences as decodeBatch() does; the logits of each,
  // (batch, vocab_size).
  virtual std::vector<float> decodeBatchLogits(const int* tokens, const int* positions) {
    return stepLogits(tokens, positions, 1);
  }
  // Waits for the work the engine queued on its device (benchmarks timing a phase; the CPU's
  // work is done when its calls return).
  virtual void synchronize() {}
  // Seconds this rank's device spent inside tensor-parallel collectives so far (0 where not measured:
  // the CPU backend, or the CUDA engine unless asked to, GpuOptions::time_collectives).
  virtual double collectiveSeconds() const { return 0; }
  // Seconds spent so far in each phase of compress() (the CUDA engine when asked to,
  // GpuOptions::time_decision_phases), in the order first seen; empty where not measured.
  virtual std::vector<std::pair<std::string, double>> decisionPhaseSeconds() const { return {}; }
  // The rows a decode step's attention walks in each (layer, KV head) of the current sequence, by
  // layer (the CUDA engine: its slots in use, holes included); empty where not reported.
  virtual std::vector<int> headRows() const { return {}; }
};

// The CPU backend: `model` must outlive the engine; `policy` (null: full cache) compresses the
// cache after every step.
std::unique_ptr<Engine> makeCpuEngine(const Model& model, const kv::PolicySpec* policy);

}  // namespace kvtp
