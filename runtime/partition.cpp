#include "runtime/partition.h"

#include <algorithm>

#include "runtime/error.h"

namespace kvtp {
namespace {

// [r*n/tp, (r+1)*n/tp): ranges of sizes differing by at most one.
std::pair<int64_t, int64_t> evenRange(int64_t n, int r, int tp) { return {n * r / tp, n * (r + 1) / tp}; }

bool endsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Partition Partition::make(const ModelConfig& c, int rank, int tp) {
  if (tp < 1 || rank < 0 || rank >= tp) throw Error("bad rank " + std::to_string(rank) + " of tp " + std::to_string(tp));
  if (c.heads % tp != 0)
    throw Error("num_attention_heads " + std::to_string(c.heads) + " is not divisible by --tp " + std::to_string(tp) +
                ": attention heads are split whole");
  if (c.kv_heads >= tp ? c.kv_heads % tp != 0 : tp % c.kv_heads != 0)
    throw Error("num_key_value_heads " + std::to_string(c.kv_heads) + " and --tp " + std::to_string(tp) +
                " do not fit: one must divide the other");
  if (c.ffn < tp || c.vocab_size < tp) throw Error("--tp " + std::to_string(tp) + " exceeds the FFN or vocabulary size");
  Partition p;
  p.rank = rank;
  p.tp = tp;
  p.q_heads = c.heads / tp;
  p.q_head_begin = rank * p.q_heads;
  if (c.kv_heads >= tp) {
    p.kv_heads = c.kv_heads / tp;
    p.kv_head_begin = rank * p.kv_heads;
  } else {
    p.kv_heads = 1;
    p.kv_head_begin = rank * c.kv_heads / tp;
  }
  std::tie(p.ffn_begin, p.ffn_end) = evenRange(c.ffn, rank, tp);
  std::tie(p.vocab_begin, p.vocab_end) = evenRange(c.vocab_size, rank, tp);
  return p;
}

Slice shardSlice(const std::string& name, const std::vector<int64_t>& shape, const ModelConfig& c, const Partition& p) {
  if (p.tp == 1) return {};
  const int64_t hd = c.head_dim;
  const bool weight = endsWith(name, ".weight");
  auto rows = [&](int64_t b, int64_t e) { return Slice{0, b, e}; };
  auto cols = [&](int64_t b, int64_t e) { return weight ? Slice{1, b, e} : Slice{}; };  // bias: replicated
  if (endsWith(name, "q_proj.weight") || endsWith(name, "q_proj.bias"))
    return rows(p.q_head_begin * hd, (p.q_head_begin + p.q_heads) * hd);
  if (endsWith(name, "k_proj.weight") || endsWith(name, "k_proj.bias") || endsWith(name, "v_proj.weight") ||
      endsWith(name, "v_proj.bias"))
    return rows(p.kv_head_begin * hd, (p.kv_head_begin + p.kv_heads) * hd);
  if (name.find("o_proj.") != std::string::npos || name.find("out_proj.") != std::string::npos)
    return cols(p.q_head_begin * hd, (p.q_head_begin + p.q_heads) * hd);
  if (name.find(".fc1.") != std::string::npos || name.find("gate_proj.") != std::string::npos ||
      name.find("up_proj.") != std::string::npos)
    return rows(p.ffn_begin, p.ffn_end);
  if (name.find(".fc2.") != std::string::npos || name.find("down_proj.") != std::string::npos)
    return cols(p.ffn_begin, p.ffn_end);
  if (endsWith(name, "embed_tokens.weight") || name == "lm_head.weight") return rows(p.vocab_begin, p.vocab_end);
  (void)shape;
  return {};  // norms, positions, project_in/out: replicated
}

std::vector<float> joinVocabSlices(const ModelConfig& c, int tp, const float* gathered, int rows, int slot) {
  std::vector<float> out(size_t(rows) * c.vocab_size);
  for (int r = 0; r < tp; ++r) {
    const auto [begin, end] = evenRange(c.vocab_size, r, tp);
    for (int i = 0; i < rows; ++i)
      std::copy_n(gathered + (size_t(r) * rows + i) * slot, end - begin, out.begin() + int64_t(i) * c.vocab_size + begin);
  }
  return out;
}

kv::HeadLayout headLayout(const ModelConfig& c, const Partition& p) {
  kv::HeadLayout h;
  h.layers = c.layers;
  h.global_kv_heads = c.kv_heads;
  h.kv_head_begin = p.kv_head_begin;
  h.local_kv_heads = p.kv_heads;
  h.head_dim = c.head_dim;
  h.replicated = c.kv_heads < p.tp;
  // The first of the ranks sharing a replicated KV head is the one counted.
  h.owner = !h.replicated || p.rank % (p.tp / c.kv_heads) == 0;
  return h;
}

}  // namespace kvtp
