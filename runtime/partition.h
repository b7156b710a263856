// How a model is split over the `tp` ranks of a tensor-parallel group (Megatron style):
//   column-parallel  q/k/v (whole heads), fc1 / gate / up (FFN columns), embedding and head (vocab rows)
//   row-parallel     out/o projection and fc2 / down (matching input columns), then all-reduce
//   replicated       norms, learned positions, project_in/out, biases of row-parallel layers
// GQA rule: when num_key_value_heads < tp, each rank holds the one KV head its query heads read
// (KV heads are replicated tp / num_key_value_heads times), which needs tp % kv_heads == 0;
// otherwise KV heads are split like query heads. Uneven FFN and vocabulary sizes split into
// ranges that differ by at most one (no padding needed).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/policy.h"
#include "runtime/config.h"
#include "runtime/safetensors.h"

namespace kvtp {

struct Partition {
  int rank = 0, tp = 1;
  int q_head_begin = 0, q_heads = 0;    // local query heads
  int kv_head_begin = 0, kv_heads = 0;  // local KV heads
  int64_t ffn_begin = 0, ffn_end = 0;
  int64_t vocab_begin = 0, vocab_end = 0;

  // Checks that the config splits over tp (before any weight is read); throws otherwise.
  static Partition make(const ModelConfig& c, int rank, int tp);
  int ffn() const { return int(ffn_end - ffn_begin); }
  int vocab() const { return int(vocab_end - vocab_begin); }
  // Local KV head read by local query head i.
  int kvHeadOf(int i, const ModelConfig& c) const { return (q_head_begin + i) / (c.heads / c.kv_heads) - kv_head_begin; }
};

// Full-vocabulary rows from every rank's slice: `gathered` holds tp blocks (rank order) of `rows`
// rows of `slot` floats (vocabSlot: room for the largest slice), rank r's logits of its vocabulary
// range first in each row. Returns (rows, vocab_size), the same on every rank.
std::vector<float> joinVocabSlices(const ModelConfig& c, int tp, const float* gathered, int rows, int slot);
inline int vocabSlot(const ModelConfig& c, int tp) { return (c.vocab_size + tp - 1) / tp; }

// Where this rank's KV heads sit among the model's, for the KV policy (kv/policy.h).
kv::HeadLayout headLayout(const ModelConfig& c, const Partition& p);

// The part of tensor `name` (full shape `shape`) that this rank reads: dim -1 for all of it.
Slice shardSlice(const std::string& name, const std::vector<int64_t>& shape, const ModelConfig& c, const Partition& p);

}  // namespace kvtp
