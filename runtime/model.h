// The forward pass, reading top to bottom like the papers: embed -> for each layer (norm, qkv,
// rope, attention over the KV cache, output projection, residual, norm, MLP, residual) -> norm
// -> head. One code path serves prefill (T tokens at once) and decode (T = 1): both append the
// new tokens' keys and values to the cache and attend causally by position.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "runtime/config.h"
#include "runtime/partition.h"
#include "runtime/weights.h"

namespace kvtp {

class Model {
 public:
  // `group` is the tensor-parallel group (not owned; it outlives the model); null means tp = 1.
  Model(ModelConfig config, ModelWeights weights, comm::Communicator* group = nullptr);
  // Reads config.json and this rank's slices of the safetensors weights of a Hugging Face folder.
  static std::unique_ptr<Model> load(const std::string& model_dir, comm::Communicator* group = nullptr);
  // Random weights of a config's shapes (syntheticWeights), this rank's slices only.
  static std::unique_ptr<Model> synthetic(const ModelConfig& config, uint64_t seed, comm::Communicator* group = nullptr);

  const ModelConfig& config() const { return config_; }
  // The folder it was loaded from (empty for synthetic weights).
  const std::string& directory() const { return directory_; }
  const ModelWeights& weights() const { return weights_; }
  const Partition& partition() const { return part_; }
  comm::Communicator* group() const { return group_; }
  kv::KVCache newCache() const;

  // Runs T new tokens at absolute `positions` (ascending, after everything in the cache) and
  // returns the final hidden states (T, word_embed_proj_dim), ready for the head.
  // With `attention`, also returns each layer's attention per local KV head (what KV policies
  // score tokens by).
  std::vector<float> forward(const int* tokens, const int* positions, int T, kv::KVCache& cache,
                             kv::StepAttention* attention = nullptr) const;
  // Where this rank's KV heads sit among the model's (for KV policies).
  kv::HeadLayout headLayout() const;
  // Per layer and local KV head, the top-`rank` left singular vectors of its K and V projection
  // rows (CSKV-style low-rank channels, docs/KV.md).
  kv::LowRankBases lowRankBases(int rank) const;

  // log p(targets[t] | prefix) from hidden row t, in float64; the logits are made a few rows at a
  // time so that a 50k-256k vocabulary never needs a (T, vocab) buffer.
  std::vector<double> logprobs(const std::vector<float>& hidden, const int* targets, int T) const;
  // The logits of `T` hidden rows over the whole vocabulary, (T, vocab_size), the same on every
  // rank (each computes its vocabulary slice; the slices are gathered): what generation samples.
  std::vector<float> logits(const float* hidden, int T) const;

 private:
  void attention(int layer, const float* x_norm, const int* positions, int T, kv::KVCache& cache, float* out,
                 kv::StepAttention* collect) const;
  void mlp(int layer, const float* x_norm, int T, float* x) const;
  // x += all-reduce(in · W^T) (+ bias, once): a row-parallel projection into the residual.
  void rowParallel(const float* in, int T, int in_dim, const Tensor& W, const Tensor& bias, float* x) const;

  ModelConfig config_;
  ModelWeights weights_;
  comm::Communicator* group_;
  Partition part_;
  std::vector<float> inv_freq_;  // RoPE frequencies (Llama)
  std::string directory_;
};

// Throws Error for a token id outside the vocabulary or a position beyond the model's context
// (every backend checks its input before any work).
void checkTokens(const ModelConfig& config, const int* tokens, const int* positions, int T);

// RoPE inverse frequencies with the config's scaling (default, linear, llama3), as transformers
// computes them.
std::vector<float> ropeInverseFrequencies(const ModelConfig& config);

}  // namespace kvtp
