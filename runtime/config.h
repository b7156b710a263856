// Model hyper-parameters in one plain struct, read from a Hugging Face config.json.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvtp {

enum class Family { Opt, Llama };

// RoPE frequency scaling (Llama): none, "linear" (positions / factor) or "llama3" (per-band).
struct RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_positions = 8192;
};

struct ModelConfig {
  Family family = Family::Llama;
  std::string model_type;  // as written in config.json
  int vocab_size = 0;
  int hidden = 0;
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int ffn = 0;             // OPT ffn_dim, Llama intermediate_size
  int max_positions = 0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  int bos_token_id = -1;
  // Ids that end generation: eos_token_id (a number or a list) of generation_config.json, else
  // of config.json; empty when neither names one.
  std::vector<int> eos_token_ids;
  // OPT
  bool pre_layer_norm = true;      // do_layer_norm_before
  bool final_layer_norm = true;    // OPT has one only when pre-LN (and not removed)
  int word_embed_proj_dim = 0;     // == hidden unless project_in/out exist
  bool enable_bias = true;
  // Llama
  double rope_theta = 10000.0;
  RopeScaling rope;
  bool attention_bias = false;
  bool mlp_bias = false;

  int qDim() const { return heads * head_dim; }
  int kvDim() const { return kv_heads * head_dim; }
  bool hasProjection() const { return family == Family::Opt && word_embed_proj_dim != hidden; }
  // Parameters, counted from the shapes (for memory plans and FLOP counts).
  int64_t parameterCount() const;
  // Parameters that take part in a matrix product per token (FLOPs = 2 x this x tokens).
  int64_t matmulParameterCount() const;
  void validate() const;
  // A low-rank KV cache (cskv) of this rank fits the heads; throws Error otherwise.
  void checkLowRank(int rank) const;
};

ModelConfig parseConfig(const nlohmann::json& j, const std::string& source);
ModelConfig loadConfig(const std::string& model_dir);

}  // namespace kvtp
