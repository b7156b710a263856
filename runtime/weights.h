// Model weights as float32 host buffers, named for their role. A model family is the small
// mapping from Hugging Face tensor names to these roles (loadWeights).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/config.h"
#include "runtime/partition.h"
#include "runtime/safetensors.h"

namespace kvtp {

using Tensor = std::vector<float>;  // row-major; shapes live in ModelConfig

struct LayerWeights {
  Tensor attn_norm_w, attn_norm_b;  // OPT self_attn_layer_norm, Llama input_layernorm (no bias)
  Tensor wq, bq, wk, bk, wv, bv;    // (heads*hd, H), (kv_heads*hd, H); biases may be empty
  Tensor wo, bo;                    // (H, heads*hd)
  Tensor ffn_norm_w, ffn_norm_b;    // OPT final_layer_norm, Llama post_attention_layernorm
  Tensor w_up, b_up;                // OPT fc1, Llama up_proj: (ffn, H)
  Tensor w_gate, b_gate;            // Llama gate_proj (ffn, H); empty for OPT
  Tensor w_down, b_down;            // OPT fc2, Llama down_proj: (H, ffn)
};

// Tensors hold only this rank's slice (runtime/partition.h); shapes below are for tp = 1.
struct ModelWeights {
  Tensor embed;                     // (vocab, word_embed_proj_dim)
  Tensor positions;                 // OPT learned positions (max_positions + 2, H)
  Tensor project_in, project_out;   // OPT when word_embed_proj_dim != H
  Tensor final_norm_w, final_norm_b;
  Tensor lm_head;                   // (vocab, word_embed_proj_dim); empty when tied to embed
  std::vector<LayerWeights> layers;
  const Tensor& head() const { return lm_head.empty() ? embed : lm_head; }
  int64_t bytes() const;
};

// Which part of the model to build: layers [layer_begin, layer_end) (-1: to the last) and, with
// `top`, the model-level tensors (embeddings, positions, projections, final norm, head). Other
// layers stay empty: a device can take a model larger than host memory a layer at a time.
struct WeightRange {
  int layer_begin = 0, layer_end = -1;
  bool top = true;
};

// Reads this rank's slice of every tensor the config needs (shardSlice), checking names, shapes
// and dtypes against the full shapes; only the slice's bytes are read.
ModelWeights loadWeights(const ModelConfig& config, const Checkpoint& checkpoint, const Partition& part,
                         const WeightRange& range = {});

// Deterministic random weights of the config's shapes (uniform, std 0.02; norms 1; biases 0),
// for benchmarks and scale runs without a checkpoint. Each element is a hash of (seed, tensor
// name, index), so a rank makes its slice alone and every tp gives the same model.
ModelWeights syntheticWeights(const ModelConfig& config, uint64_t seed, const Partition& part,
                              const WeightRange& range = {});
// Elements of this rank's slices of the tensors the config requires (optional biases not
// counted): the memory plan before anything is read.
int64_t weightElements(const ModelConfig& config, const Partition& part);

// This rank's weights, one range at a time (a checkpoint read or synthetic weights).
using WeightSource = std::function<ModelWeights(const WeightRange&)>;
// From the safetensors of a Hugging Face folder (opened, and checked, now; read per range).
WeightSource checkpointSource(const ModelConfig& config, const Partition& part, const std::string& model_dir);
WeightSource syntheticSource(const ModelConfig& config, const Partition& part, uint64_t seed);

}  // namespace kvtp
