// Small hand-checkable KV caches and layouts shared by tests/kv_eviction_test.cpp and
// tests/kv_storage_test.cpp.
#pragma once
#include <vector>

#include "kv/policy.h"

namespace kvtp::kv::cases {

// A cache of `heads` KV heads, 1 layer, head_dim 2, holding positions 0..n-1.
inline KVCache filled(int n, int heads = 1, int hd = 2) {
  KVCache c(1, heads, hd);
  for (int t = 0; t < n; ++t) {
    std::vector<float> k(size_t(heads) * hd, float(t)), v(size_t(heads) * hd, float(-t));
    c.append(0, k.data(), v.data(), &t, 1);
  }
  return c;
}

inline HeadLayout layout(int heads = 1, int hd = 2) {
  HeadLayout l;
  l.layers = 1;
  l.global_kv_heads = l.local_kv_heads = heads;
  l.head_dim = hd;
  return l;
}

inline std::vector<int> positions(const KVCache& c, int head = 0) { return c.head(0, head).positions; }

// Attention of one decode query over n entries of each head: `hot` entries get weight 0.5 / |hot|,
// the rest share the remaining half.
inline StepAttention attentionTo(const std::vector<std::vector<int>>& hot, int n) {
  StepAttention a;
  a.T = 1;
  for (auto& h : hot) {
    std::vector<float> row(size_t(n), 0.5f / float(n - h.size()));
    for (int i : h) row[size_t(i)] = 0.5f / float(h.size());
    a.blocks.push_back(row);
  }
  return a;
}

}  // namespace kvtp::kv::cases
