#include "runtime/config.h"

#include <filesystem>
#include <fstream>

#include "runtime/error.h"

namespace kvtp {
namespace {

template <class T>
T need(const nlohmann::json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null())
    throw Error(source + ": missing \"" + key + "\"");
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(source + ": \"" + key + "\" has the wrong type (" + j[key].dump() + ")");
  }
}

template <class T>
T get(const nlohmann::json& j, const char* key, T fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return j[key].get<T>();
}

// eos_token_id as transformers writes it: a number, a list of numbers, or null.
std::vector<int> eosIds(const nlohmann::json& j, const std::string& source) {
  if (!j.contains("eos_token_id") || j["eos_token_id"].is_null()) return {};
  const auto& e = j["eos_token_id"];
  try {
    return e.is_array() ? e.get<std::vector<int>>() : std::vector<int>{e.get<int>()};
  } catch (const nlohmann::json::exception&) {
    throw Error(source + ": \"eos_token_id\" is neither a token id nor a list of them (" + e.dump() + ")");
  }
}

nlohmann::json readJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read '" + path + "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path + "' is not valid JSON: " + e.what());
  }
}

// Llama rope settings come as "rope_scaling" (transformers 4) or "rope_parameters"
// (transformers 5, which also moves rope_theta inside it).
void parseRope(const nlohmann::json& j, ModelConfig& c, const std::string& source) {
  c.rope_theta = get<double>(j, "rope_theta", 10000.0);
  const nlohmann::json* r = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) r = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) r = &j["rope_scaling"];
  if (!r) return;
  c.rope_theta = get<double>(*r, "rope_theta", c.rope_theta);
  c.rope.type = get<std::string>(*r, "rope_type", get<std::string>(*r, "type", "default"));
  c.rope.factor = get<double>(*r, "factor", 1.0);
  c.rope.low_freq_factor = get<double>(*r, "low_freq_factor", 1.0);
  c.rope.high_freq_factor = get<double>(*r, "high_freq_factor", 4.0);
  c.rope.original_max_positions = get<int>(*r, "original_max_position_embeddings", 8192);
  if (c.rope.type != "default" && c.rope.type != "linear" && c.rope.type != "llama3")
    throw Error(source + ": rope type \"" + c.rope.type +
                "\" is not supported (supported: default, linear, llama3)");
}

}  // namespace

ModelConfig parseConfig(const nlohmann::json& j, const std::string& source) {
  ModelConfig c;
  c.model_type = need<std::string>(j, "model_type", source);
  if (c.model_type != "opt" && c.model_type != "llama")
    throw Error(source + ": model_type \"" + c.model_type + "\" is not supported (supported: opt, llama)");
  c.vocab_size = need<int>(j, "vocab_size", source);
  c.hidden = need<int>(j, "hidden_size", source);
  c.layers = need<int>(j, "num_hidden_layers", source);
  c.heads = need<int>(j, "num_attention_heads", source);
  c.max_positions = need<int>(j, "max_position_embeddings", source);
  c.bos_token_id = get<int>(j, "bos_token_id", -1);
  c.eos_token_ids = eosIds(j, source);
  c.tie_embeddings = get<bool>(j, "tie_word_embeddings", true);
  if (c.model_type == "opt") {
    c.family = Family::Opt;
    c.kv_heads = c.heads;
    c.ffn = need<int>(j, "ffn_dim", source);
    c.pre_layer_norm = get<bool>(j, "do_layer_norm_before", true);
    c.final_layer_norm = c.pre_layer_norm && !get<bool>(j, "_remove_final_layer_norm", false);
    c.word_embed_proj_dim = get<int>(j, "word_embed_proj_dim", c.hidden);
    c.enable_bias = get<bool>(j, "enable_bias", true);
    c.norm_eps = 1e-5;  // OPT's nn.LayerNorm default
    c.tie_embeddings = true;  // OPT's head is always the input embedding
    const auto act = get<std::string>(j, "activation_function", "relu");
    if (act != "relu") throw Error(source + ": OPT activation \"" + act + "\" is not supported (relu)");
    if (!get<bool>(j, "layer_norm_elementwise_affine", true))
      throw Error(source + ": OPT without layer-norm affine parameters is not supported");
  } else {
    c.family = Family::Llama;
    c.kv_heads = get<int>(j, "num_key_value_heads", c.heads);
    c.ffn = need<int>(j, "intermediate_size", source);
    c.norm_eps = get<double>(j, "rms_norm_eps", 1e-6);
    c.attention_bias = get<bool>(j, "attention_bias", false);
    c.mlp_bias = get<bool>(j, "mlp_bias", false);
    c.word_embed_proj_dim = c.hidden;
    const auto act = get<std::string>(j, "hidden_act", "silu");
    if (act != "silu") throw Error(source + ": Llama activation \"" + act + "\" is not supported (silu)");
    parseRope(j, c, source);
  }
  c.head_dim = get<int>(j, "head_dim", c.heads > 0 ? c.hidden / c.heads : 0);
  c.validate();
  return c;
}

void ModelConfig::validate() const {
  auto fail = [&](const std::string& m) { throw Error("model config (" + model_type + "): " + m); };
  if (vocab_size <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || ffn <= 0 || max_positions <= 0)
    fail("sizes must be positive");
  if (kv_heads <= 0 || heads % kv_heads != 0)
    fail("num_attention_heads " + std::to_string(heads) + " is not a multiple of num_key_value_heads " +
         std::to_string(kv_heads));
  if (head_dim <= 0 || (family == Family::Llama && head_dim % 2 != 0)) fail("bad head_dim");
  if (family == Family::Opt && head_dim * heads != hidden)
    fail("hidden_size " + std::to_string(hidden) + " is not divisible by num_attention_heads " +
         std::to_string(heads));
}

int64_t ModelConfig::matmulParameterCount() const {
  const int64_t h = hidden, q = qDim(), kv = kvDim(), f = ffn;
  int64_t per_layer = h * q + 2 * h * kv + q * h;
  per_layer += (family == Family::Llama ? 3 : 2) * h * f;
  int64_t total = per_layer * layers + int64_t(word_embed_proj_dim) * vocab_size;  // the head
  if (hasProjection()) total += 2 * int64_t(hidden) * word_embed_proj_dim;
  return total;
}

int64_t ModelConfig::parameterCount() const {
  int64_t total = matmulParameterCount();
  if (!(family == Family::Opt || tie_embeddings)) total += int64_t(vocab_size) * hidden;
  if (family == Family::Opt) total += int64_t(max_positions + 2) * hidden;
  return total;  // norms and biases are < 0.1% at any real size and left out
}

ModelConfig loadConfig(const std::string& model_dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(model_dir)) throw Error("model folder '" + model_dir + "' does not exist");
  const auto path = (fs::path(model_dir) / "config.json").string();
  if (!fs::exists(path)) throw Error("'" + path + "' not found: a Hugging Face model folder needs config.json");
  ModelConfig c = parseConfig(readJsonFile(path), path);
  // generation_config.json is what transformers' generate() stops by.
  const auto generation = (fs::path(model_dir) / "generation_config.json").string();
  if (fs::exists(generation))
    if (auto eos = eosIds(readJsonFile(generation), generation); !eos.empty()) c.eos_token_ids = eos;
  return c;
}

void ModelConfig::checkLowRank(int rank) const {
  if (rank > head_dim) throw Error("cskv rank " + std::to_string(rank) + " exceeds head_dim " + std::to_string(head_dim));
}

}  // namespace kvtp
