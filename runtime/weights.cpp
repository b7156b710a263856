#include "runtime/weights.h"

#include <algorithm>
#include <memory>
#include <random>

#include "kernels/splitmix.h"
#include "runtime/error.h"

namespace kvtp {
namespace {

// The one place that knows Hugging Face tensor names. `fill(name, shape, required)` returns the
// tensor (empty if optional and absent); the same walk serves loading and synthetic weights.
template <class Fill>
ModelWeights buildWeights(const ModelConfig& c, const WeightRange& range, Fill&& fill) {
  using S = std::vector<int64_t>;
  const int64_t H = c.hidden, Q = c.qDim(), KV = c.kvDim(), F = c.ffn, V = c.vocab_size,
                P = c.word_embed_proj_dim;
  ModelWeights w;
  w.layers.resize(c.layers);
  const int first = range.layer_begin, last = range.layer_end < 0 ? c.layers : std::min(range.layer_end, c.layers);
  // Model-level tensors only when asked for: `fill` is called for the wanted tensors alone.
  auto top = [&](const std::string& name, const S& shape, bool required) {
    return range.top ? fill(name, shape, required) : Tensor{};
  };
  if (c.family == Family::Opt) {
    const std::string d = "model.decoder.";
    w.embed = top(d + "embed_tokens.weight", S{V, P}, true);
    w.positions = top(d + "embed_positions.weight", S{c.max_positions + 2, H}, true);
    if (c.hasProjection()) {
      w.project_in = top(d + "project_in.weight", S{H, P}, true);
      w.project_out = top(d + "project_out.weight", S{P, H}, true);
    }
    if (c.final_layer_norm) {
      w.final_norm_w = top(d + "final_layer_norm.weight", S{H}, true);
      w.final_norm_b = top(d + "final_layer_norm.bias", S{H}, true);
    }
    for (int i = first; i < last; ++i) {
      auto& L = w.layers[i];
      const std::string p = d + "layers." + std::to_string(i) + ".";
      const bool b = c.enable_bias;
      L.attn_norm_w = fill(p + "self_attn_layer_norm.weight", S{H}, true);
      L.attn_norm_b = fill(p + "self_attn_layer_norm.bias", S{H}, true);
      L.wq = fill(p + "self_attn.q_proj.weight", S{Q, H}, true);
      L.wk = fill(p + "self_attn.k_proj.weight", S{KV, H}, true);
      L.wv = fill(p + "self_attn.v_proj.weight", S{KV, H}, true);
      L.wo = fill(p + "self_attn.out_proj.weight", S{H, Q}, true);
      L.bq = fill(p + "self_attn.q_proj.bias", S{Q}, b);
      L.bk = fill(p + "self_attn.k_proj.bias", S{KV}, b);
      L.bv = fill(p + "self_attn.v_proj.bias", S{KV}, b);
      L.bo = fill(p + "self_attn.out_proj.bias", S{H}, b);
      L.ffn_norm_w = fill(p + "final_layer_norm.weight", S{H}, true);
      L.ffn_norm_b = fill(p + "final_layer_norm.bias", S{H}, true);
      L.w_up = fill(p + "fc1.weight", S{F, H}, true);
      L.b_up = fill(p + "fc1.bias", S{F}, b);
      L.w_down = fill(p + "fc2.weight", S{H, F}, true);
      L.b_down = fill(p + "fc2.bias", S{H}, b);
    }
  } else {
    w.embed = top("model.embed_tokens.weight", S{V, H}, true);
    w.final_norm_w = top("model.norm.weight", S{H}, true);
    if (!c.tie_embeddings) w.lm_head = top("lm_head.weight", S{V, H}, true);
    for (int i = first; i < last; ++i) {
      auto& L = w.layers[i];
      const std::string p = "model.layers." + std::to_string(i) + ".";
      const bool ab = c.attention_bias, mb = c.mlp_bias;
      L.attn_norm_w = fill(p + "input_layernorm.weight", S{H}, true);
      L.wq = fill(p + "self_attn.q_proj.weight", S{Q, H}, true);
      L.wk = fill(p + "self_attn.k_proj.weight", S{KV, H}, true);
      L.wv = fill(p + "self_attn.v_proj.weight", S{KV, H}, true);
      L.wo = fill(p + "self_attn.o_proj.weight", S{H, Q}, true);
      if (ab) {
        L.bq = fill(p + "self_attn.q_proj.bias", S{Q}, true);
        L.bk = fill(p + "self_attn.k_proj.bias", S{KV}, true);
        L.bv = fill(p + "self_attn.v_proj.bias", S{KV}, true);
        L.bo = fill(p + "self_attn.o_proj.bias", S{H}, true);
      }
      L.ffn_norm_w = fill(p + "post_attention_layernorm.weight", S{H}, true);
      L.w_gate = fill(p + "mlp.gate_proj.weight", S{F, H}, true);
      L.w_up = fill(p + "mlp.up_proj.weight", S{F, H}, true);
      L.w_down = fill(p + "mlp.down_proj.weight", S{H, F}, true);
      if (mb) {
        L.b_gate = fill(p + "mlp.gate_proj.bias", S{F}, true);
        L.b_up = fill(p + "mlp.up_proj.bias", S{F}, true);
        L.b_down = fill(p + "mlp.down_proj.bias", S{H}, true);
      }
    }
  }
  return w;
}

}  // namespace

int64_t ModelWeights::bytes() const {
  auto sz = [](const Tensor& t) { return int64_t(t.size() * sizeof(float)); };
  int64_t b = sz(embed) + sz(positions) + sz(project_in) + sz(project_out) + sz(final_norm_w) +
              sz(final_norm_b) + sz(lm_head);
  for (auto& L : layers)
    for (const Tensor* t : {&L.attn_norm_w, &L.attn_norm_b, &L.wq, &L.bq, &L.wk, &L.bk, &L.wv, &L.bv, &L.wo,
                            &L.bo, &L.ffn_norm_w, &L.ffn_norm_b, &L.w_up, &L.b_up, &L.w_gate, &L.b_gate,
                            &L.w_down, &L.b_down})
      b += sz(*t);
  return b;
}

ModelWeights loadWeights(const ModelConfig& config, const Checkpoint& ck, const Partition& part,
                         const WeightRange& range) {
  // Some OPT checkpoints (facebook/opt-*) store names without the "model." prefix.
  const bool bare = config.family == Family::Opt && !ck.has("model.decoder.embed_tokens.weight") &&
                    ck.has("decoder.embed_tokens.weight");
  return buildWeights(config, range, [&](const std::string& name, const std::vector<int64_t>& shape, bool required) {
    const std::string stored = bare && name.rfind("model.", 0) == 0 ? name.substr(6) : name;
    if (!ck.has(stored)) {
      if (required) throw Error("checkpoint: tensor '" + stored + "' is missing (needed by this " +
                                config.model_type + " config)");
      return Tensor{};
    }
    return ck.read(stored, shape, shardSlice(name, shape, config, part));
  });
}

WeightSource checkpointSource(const ModelConfig& config, const Partition& part, const std::string& model_dir) {
  auto checkpoint = std::make_shared<const Checkpoint>(model_dir);
  return [config, part, checkpoint](const WeightRange& r) { return loadWeights(config, *checkpoint, part, r); };
}

WeightSource syntheticSource(const ModelConfig& config, const Partition& part, uint64_t seed) {
  return [config, part, seed](const WeightRange& r) { return syntheticWeights(config, seed, part, r); };
}

int64_t weightElements(const ModelConfig& config, const Partition& part) {
  int64_t n = 0;
  buildWeights(config, {}, [&](const std::string& name, const std::vector<int64_t>& shape, bool required) {
    if (!required) return Tensor{};
    const Slice sl = shardSlice(name, shape, config, part);
    int64_t e = 1;
    for (int64_t d : shape) e *= d;
    n += sl.dim < 0 ? e : e / shape[sl.dim] * (sl.end - sl.begin);
    return Tensor{};
  });
  return n;
}

ModelWeights syntheticWeights(const ModelConfig& config, uint64_t seed, const Partition& part,
                              const WeightRange& range) {
  return buildWeights(config, range, [&](const std::string& name, const std::vector<int64_t>& shape, bool required) {
    if (!required) return Tensor{};
    const Slice sl = shardSlice(name, shape, config, part);
    // View as (outer, dim, inner) around the sliced dimension (dim 0 when whole).
    const int d = sl.dim < 0 ? 0 : sl.dim;
    int64_t outer = 1, inner = 1;
    for (int i = 0; i < d; ++i) outer *= shape[i];
    for (size_t i = d + 1; i < shape.size(); ++i) inner *= shape[i];
    const int64_t b = sl.dim < 0 ? 0 : sl.begin, e = sl.dim < 0 ? shape[d] : sl.end, len = e - b;
    Tensor t(static_cast<size_t>(outer * len * inner));
    const bool norm_weight = name.find("norm") != std::string::npos && name.ends_with("weight");
    if (norm_weight || shape.size() == 1) {
      std::fill(t.begin(), t.end(), norm_weight ? 1.0f : 0.0f);
      return t;
    }
    const uint64_t key = kernels::splitmix64(seed ^ std::hash<std::string>{}(name));
    constexpr float kScale = 0.02f * 1.7320508f / 9007199254740992.0f;  // uniform std 0.02 from 53 bits
#pragma omp parallel for collapse(2)
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t r = 0; r < len; ++r) {
        const int64_t global_row = (o * shape[d] + b + r) * inner, local_row = (o * len + r) * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const uint64_t h = kernels::splitmix64(key + uint64_t(global_row + i)) >> 11;  // 53 bits
          t[size_t(local_row + i)] = (2.0f * float(h) - 9007199254740992.0f) * kScale;
        }
      }
    return t;
  });
}

}  // namespace kvtp
