// The forward pass, reading top to bottom like the papers: embed -> for each layer (norm, qkv,
// rope, attention over the KV cache, output projection, residual, norm, MLP, residual) -> norm
// -> head. One code path serves prefill (T tokens at once) and decode (T = 1): both append the
// new tokens' keys and values to the cache and attend causally by position.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_cache.h"
#include "runtime/config.h"
#include "runtime/weights.h"

namespace kvtp {

class Model {
 public:
  Model(ModelConfig config, ModelWeights weights);
  // Reads config.json and the safetensors weights of a Hugging Face folder.
  static std::unique_ptr<Model> load(const std::string& model_dir);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  kv::KVCache newCache() const;

  // Runs T new tokens at absolute `positions` (ascending, after everything in the cache) and
  // returns the final hidden states (T, word_embed_proj_dim), ready for the head.
  std::vector<float> forward(const int* tokens, const int* positions, int T, kv::KVCache& cache) const;

  // log p(targets[t] | prefix) from hidden row t, in float64; the logits are made a few rows at a
  // time so that a 50k-256k vocabulary never needs a (T, vocab) buffer.
  std::vector<double> logprobs(const std::vector<float>& hidden, const int* targets, int T) const;

 private:
  void attention(int layer, const float* x_norm, const int* positions, int T, kv::KVCache& cache,
                 float* out) const;
  void mlp(int layer, const float* x_norm, int T, float* x) const;

  ModelConfig config_;
  ModelWeights weights_;
  std::vector<float> inv_freq_;  // RoPE frequencies (Llama)
};

// RoPE inverse frequencies with the config's scaling (default, linear, llama3), as transformers
// computes them.
std::vector<float> ropeInverseFrequencies(const ModelConfig& config);

}  // namespace kvtp
