#include "runtime/presets.h"

#include <filesystem>
#include <fstream>
#include <map>

#include "runtime/error.h"

namespace kvtp {
namespace {

nlohmann::json opt(int hidden, int heads, int layers, int ffn, int proj = 0) {
  return {{"model_type", "opt"}, {"vocab_size", 50272}, {"hidden_size", hidden},
          {"num_attention_heads", heads}, {"num_hidden_layers", layers}, {"ffn_dim", ffn},
          {"max_position_embeddings", 2048}, {"word_embed_proj_dim", proj ? proj : hidden},
          {"do_layer_norm_before", proj == 0}, {"bos_token_id", 2}};
}

nlohmann::json llama(int vocab, int hidden, int heads, int kv_heads, int layers, int ffn, int max_pos,
                     double theta) {
  return {{"model_type", "llama"}, {"vocab_size", vocab}, {"hidden_size", hidden},
          {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads}, {"num_hidden_layers", layers},
          {"intermediate_size", ffn}, {"max_position_embeddings", max_pos}, {"rope_theta", theta},
          {"rms_norm_eps", 1e-5}, {"tie_word_embeddings", false}, {"bos_token_id", 1}};
}

// Shapes from each checkpoint's config.json on the Hugging Face hub.
const std::map<std::string, nlohmann::json>& presets() {
  static const std::map<std::string, nlohmann::json> p = {
      {"opt-125m", opt(768, 12, 12, 3072)},
      {"opt-350m", opt(1024, 16, 24, 4096, 512)},
      {"opt-1.3b", opt(2048, 32, 24, 8192)},
      {"opt-2.7b", opt(2560, 32, 32, 10240)},
      {"opt-6.7b", opt(4096, 32, 32, 16384)},
      {"opt-13b", opt(5120, 40, 40, 20480)},
      {"opt-30b", opt(7168, 56, 48, 28672)},
      {"opt-66b", opt(9216, 72, 64, 36864)},
      {"llama-2-7b", llama(32000, 4096, 32, 32, 32, 11008, 4096, 10000.0)},
      {"llama-2-13b", llama(32000, 5120, 40, 40, 40, 13824, 4096, 10000.0)},
      {"llama-2-70b", llama(32000, 8192, 64, 8, 80, 28672, 4096, 10000.0)},
      {"llama-3-8b", llama(128256, 4096, 32, 8, 32, 14336, 8192, 500000.0)},
  };
  return p;
}

}  // namespace

std::vector<std::string> presetNames() {
  std::vector<std::string> names;
  for (auto& [n, j] : presets()) names.push_back(n);
  return names;
}

ModelConfig syntheticConfig(const std::string& name) {
  if (auto it = presets().find(name); it != presets().end()) return parseConfig(it->second, "preset " + name);
  if (std::filesystem::is_regular_file(name)) {
    std::ifstream in(name);
    try {
      return parseConfig(nlohmann::json::parse(in), name);
    } catch (const nlohmann::json::exception& e) {
      throw Error("'" + name + "' is not valid JSON: " + e.what());
    }
  }
  std::string all;
  for (auto& n : presetNames()) all += (all.empty() ? "" : ", ") + n;
  throw Error("'" + name + "' is neither a config.json file nor a preset (" + all + ")");
}

}  // namespace kvtp
