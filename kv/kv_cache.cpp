#include "kv/kv_cache.h"

#include <algorithm>
#include <stdexcept>

namespace kvtp::kv {

KVCache::KVCache(int layers, int kv_heads, int head_dim)
    : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), heads_(size_t(layers) * kv_heads) {}

void KVCache::append(int layer, const float* k, const float* v, const int* positions, int T) {
  const int row = kv_heads_ * head_dim_;
  for (int h = 0; h < kv_heads_; ++h) {
    HeadCache& c = heads_[size_t(layer) * kv_heads_ + h];
    for (int t = 0; t < T; ++t) {
      const float* kr = k + int64_t(t) * row + h * head_dim_;
      const float* vr = v + int64_t(t) * row + h * head_dim_;
      c.keys.insert(c.keys.end(), kr, kr + head_dim_);
      c.values.insert(c.values.end(), vr, vr + head_dim_);
      c.positions.push_back(positions[t]);
      c.score.push_back(0.0);
      c.history.push_back(0);
      c.quantized.push_back(0);
    }
  }
}

void KVCache::retain(int layer, int head, const std::vector<int>& keep) {
  HeadCache& c = heads_[size_t(layer) * kv_heads_ + head];
  int out = 0;
  for (int idx : keep) {
    if (idx < out || idx >= c.length()) throw std::out_of_range("KVCache::retain: indices must ascend");
    std::copy_n(c.keys.begin() + int64_t(idx) * head_dim_, head_dim_, c.keys.begin() + int64_t(out) * head_dim_);
    std::copy_n(c.values.begin() + int64_t(idx) * head_dim_, head_dim_, c.values.begin() + int64_t(out) * head_dim_);
    c.positions[out] = c.positions[idx];
    c.score[out] = c.score[idx];
    c.history[out] = c.history[idx];
    c.quantized[out] = c.quantized[idx];
    ++out;
  }
  c.keys.resize(size_t(out) * head_dim_);
  c.values.resize(size_t(out) * head_dim_);
  c.positions.resize(out);
  c.score.resize(out);
  c.history.resize(out);
  c.quantized.resize(out);
}

void KVCache::clear() {
  for (auto& c : heads_) {
    c.keys.clear();
    c.values.clear();
    c.positions.clear();
    c.score.clear();
    c.history.clear();
    c.quantized.clear();
  }
}

int64_t KVCache::tokensStored() const {
  int64_t n = 0;
  for (auto& c : heads_) n += c.length();
  return n;
}

int64_t KVCache::bytes() const {
  int64_t b = 0;
  for (auto& c : heads_) b += int64_t(c.length()) * (2 * head_dim_ * int64_t(sizeof(float)) + sizeof(int32_t));
  return b;
}

}  // namespace kvtp::kv
