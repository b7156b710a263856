// The KV cache: per layer, per (local) KV head, a variable-length list of kept tokens with their
// keys, values and absolute positions. Heads are independent so that compression policies can
// keep different tokens per head; attention masks by position, not by index.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvtp::kv {

struct HeadCache {
  std::vector<float> keys;        // (length, head_dim)
  std::vector<float> values;      // (length, head_dim)
  std::vector<int32_t> positions; // (length): the token's absolute position
  // Per entry, kept in step with the entries by append/retain; owned by kv::Policy.
  std::vector<double> score;      // the eviction policy's importance score
  std::vector<uint64_t> history;  // Scissorhands: one bit per recent step, 1 = attended above average
  std::vector<uint8_t> quantized; // 1 once quantized, 2 once reduced to low rank (kv/lowrank.h)
  int length() const { return int(positions.size()); }
};

class KVCache {
 public:
  KVCache(int layers, int kv_heads, int head_dim);

  // Appends T tokens to every head of `layer`; k and v are (T, kv_heads * head_dim).
  void append(int layer, const float* k, const float* v, const int* positions, int T);
  // Keeps only entries `keep` (ascending indices into the head's current list).
  void retain(int layer, int head, const std::vector<int>& keep);
  void clear();

  const HeadCache& head(int layer, int h) const { return heads_[size_t(layer) * kv_heads_ + h]; }
  HeadCache& head(int layer, int h) { return heads_[size_t(layer) * kv_heads_ + h]; }
  int layers() const { return layers_; }
  int kvHeads() const { return kv_heads_; }
  int headDim() const { return head_dim_; }
  int64_t tokensStored() const;  // summed over layers and heads
  int64_t bytes() const;         // keys + values at float32, plus the position index (in memory here)

 private:
  int layers_, kv_heads_, head_dim_;
  std::vector<HeadCache> heads_;
};

}  // namespace kvtp::kv
