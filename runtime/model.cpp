#include "runtime/model.h"

#include <cmath>

#include "kernels/cpu_ops.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"

namespace kvtp {

namespace k = kernels;

std::vector<float> ropeInverseFrequencies(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  const auto& r = c.rope;
  for (int i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(c.rope_theta, double(2 * i) / c.head_dim);
    if (r.type == "linear") {
      f /= r.factor;
    } else if (r.type == "llama3") {
      const double low_wavelen = r.original_max_positions / r.low_freq_factor;
      const double high_wavelen = r.original_max_positions / r.high_freq_factor;
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_wavelen) {
        f /= r.factor;
      } else if (wavelen >= high_wavelen) {  // between the bands: interpolate
        const double smooth = (r.original_max_positions / wavelen - r.low_freq_factor) /
                              (r.high_freq_factor - r.low_freq_factor);
        f = (1 - smooth) * f / r.factor + smooth * f;
      }
    }
    inv[i] = float(f);
  }
  return inv;
}

void checkTokens(const ModelConfig& c, const int* tokens, const int* positions, int T) {
  for (int t = 0; t < T; ++t) {
    if (tokens[t] < 0 || tokens[t] >= c.vocab_size)
      throw Error("token id " + std::to_string(tokens[t]) + " is outside the vocabulary [0, " +
                  std::to_string(c.vocab_size) + ")");
    if (positions[t] < 0 || positions[t] >= c.max_positions)
      throw Error("position " + std::to_string(positions[t]) + " is beyond the model's max_position_embeddings " +
                  std::to_string(c.max_positions));
  }
}

namespace {
Partition partitionFor(const ModelConfig& c, comm::Communicator* group) {
  return group ? Partition::make(c, group->rank(), group->size()) : Partition::make(c, 0, 1);
}
}  // namespace

Model::Model(ModelConfig config, ModelWeights weights, comm::Communicator* group)
    : config_(std::move(config)), weights_(std::move(weights)), group_(group), part_(partitionFor(config_, group)) {
  if (config_.family == Family::Llama) inv_freq_ = ropeInverseFrequencies(config_);
}

std::unique_ptr<Model> Model::load(const std::string& model_dir, comm::Communicator* group) {
  ModelConfig config = loadConfig(model_dir);
  const Partition part = partitionFor(config, group);  // fails before any weight is read
  Checkpoint checkpoint(model_dir);
  auto model = std::make_unique<Model>(config, loadWeights(config, checkpoint, part), group);
  model->directory_ = model_dir;
  return model;
}

std::unique_ptr<Model> Model::synthetic(const ModelConfig& config, uint64_t seed, comm::Communicator* group) {
  const Partition part = partitionFor(config, group);
  return std::make_unique<Model>(config, syntheticWeights(config, seed, part), group);
}

kv::KVCache Model::newCache() const { return kv::KVCache(config_.layers, part_.kv_heads, config_.head_dim); }

void Model::rowParallel(const float* in, int T, int in_dim, const Tensor& W, const Tensor& bias, float* x) const {
  const float* b = bias.empty() || part_.rank != 0 ? nullptr : bias.data();  // the bias is added once
  if (part_.tp == 1) {
    k::linear(in, T, in_dim, W.data(), config_.hidden, b, x, true);
    return;
  }
  std::vector<float> partial(size_t(T) * config_.hidden);
  k::linear(in, T, in_dim, W.data(), config_.hidden, b, partial.data());
  group_->allReduceSum(partial.data(), partial.size());
  k::addInPlace(x, partial.data(), int64_t(partial.size()));
}

kv::HeadLayout Model::headLayout() const { return kvtp::headLayout(config_, part_); }

kv::LowRankBases Model::lowRankBases(int rank) const {
  const int hd = config_.head_dim, H = config_.hidden;
  config_.checkLowRank(rank);
  kv::LowRankBases b;
  b.rank = rank;
  b.rope_inv_freq = inv_freq_;
  for (const auto& L : weights_.layers) kv::addLayerBases(b, L.wk.data(), L.wv.data(), part_.kv_heads, hd, H);
  return b;
}

void Model::attention(int layer, const float* xn, const int* positions, int T, kv::KVCache& cache, float* out,
                      kv::StepAttention* collect) const {
  const auto& c = config_;
  const auto& L = weights_.layers[layer];
  const int hd = c.head_dim, Q = part_.q_heads * hd, KV = part_.kv_heads * hd;
  std::vector<float> q(size_t(T) * Q), kx(size_t(T) * KV), vx(size_t(T) * KV), ctx(size_t(T) * Q);
  k::linear(xn, T, c.hidden, L.wq.data(), Q, L.bq.empty() ? nullptr : L.bq.data(), q.data());
  k::linear(xn, T, c.hidden, L.wk.data(), KV, L.bk.empty() ? nullptr : L.bk.data(), kx.data());
  k::linear(xn, T, c.hidden, L.wv.data(), KV, L.bv.empty() ? nullptr : L.bv.data(), vx.data());
  if (collect && collect->want_queries)  // before RoPE: each query head's rows after its KV head's others
    for (int h = 0; h < part_.q_heads; ++h) {
      auto& block = collect->queries[size_t(layer) * part_.kv_heads + part_.kvHeadOf(h, c)];
      for (int t = 0; t < T; ++t) block.insert(block.end(), q.begin() + int64_t(t) * Q + h * hd, q.begin() + int64_t(t) * Q + (h + 1) * hd);
    }
  if (c.family == Family::Llama) {
    k::applyRope(q.data(), T, part_.q_heads, hd, positions, inv_freq_.data());
    k::applyRope(kx.data(), T, part_.kv_heads, hd, positions, inv_freq_.data());
  }
  cache.append(layer, kx.data(), vx.data(), positions, T);
  // (T, local heads * hd) queries; each reads its KV head (GQA: heads / kv_heads share one).
  const float scale = float(1.0 / std::sqrt(double(hd)));
  // Heads in parallel, with BLAS single-threaded inside (OpenBLAS's OpenMP build); a decode step
  // over a short cache is too little work to be worth waking threads for.
  const int64_t cached = cache.head(layer, 0).length();
  const bool probabilities = collect && collect->want_probabilities;
  std::vector<std::vector<float>> probs(probabilities ? part_.q_heads : 0);
#pragma omp parallel for schedule(dynamic) if (T * cached >= 4096)
  for (int h = 0; h < part_.q_heads; ++h) {
    const int kv_head = part_.kvHeadOf(h, c);
    const auto& kvh = cache.head(layer, kv_head);
    std::vector<float> scratch;  // dequantized rows, when the head holds packed entries
    const kv::HeadRows rows = cache.rows(layer, kv_head, scratch);
    float* p = nullptr;
    if (probabilities) {
      probs[h].resize(size_t(T) * kvh.length());
      p = probs[h].data();
    }
    k::attendHead(q.data() + h * hd, Q, positions, T, rows.keys, rows.values, kvh.positions.data(),
                  kvh.length(), hd, scale, ctx.data() + h * hd, Q, p);
  }
  if (probabilities) {  // sum over the query heads that read each KV head
    for (int h = 0; h < part_.q_heads; ++h) {
      auto& block = collect->blocks[size_t(layer) * part_.kv_heads + part_.kvHeadOf(h, c)];
      if (block.empty()) block.assign(probs[h].size(), 0.0f);
      k::addInPlace(block.data(), probs[h].data(), int64_t(block.size()));
    }
  }
  if (collect && collect->want_output_norms)  // CriticalKV: ||W_o v||_1, W_o's columns of each query head
    for (int h = 0; h < part_.q_heads; ++h) {
      auto& norms = collect->output_norms[size_t(layer) * part_.kv_heads + part_.kvHeadOf(h, c)];
      norms.resize(size_t(T), 0.0f);
      for (int t = 0; t < T; ++t) {
        const float* v = vx.data() + int64_t(t) * KV + part_.kvHeadOf(h, c) * hd;
        double sum = 0;
        for (int j = 0; j < c.hidden; ++j) {
          const float* w = L.wo.data() + int64_t(j) * Q + h * hd;  // W_o is (hidden, local q heads x hd)
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += double(w[d]) * v[d];
          sum += std::abs(dot);
        }
        norms[t] += float(sum);
      }
    }
  rowParallel(ctx.data(), T, Q, L.wo, L.bo, out);
}

void Model::mlp(int layer, const float* xn, int T, float* x) const {
  const auto& c = config_;
  const auto& L = weights_.layers[layer];
  const int F = part_.ffn();
  std::vector<float> up(size_t(T) * F);
  k::linear(xn, T, c.hidden, L.w_up.data(), F, L.b_up.empty() ? nullptr : L.b_up.data(), up.data());
  if (c.family == Family::Llama) {
    std::vector<float> gate(size_t(T) * F);
    k::linear(xn, T, c.hidden, L.w_gate.data(), F, L.b_gate.empty() ? nullptr : L.b_gate.data(), gate.data());
    k::siluMul(gate.data(), up.data(), int64_t(gate.size()));
    up.swap(gate);
  } else {
    k::relu(up.data(), int64_t(up.size()));
  }
  rowParallel(up.data(), T, F, L.w_down, L.b_down, x);
}

std::vector<float> Model::forward(const int* tokens, const int* positions, int T, kv::KVCache& cache,
                                  kv::StepAttention* collect) const {
  if (collect) {
    collect->T = T;
    collect->blocks.assign(size_t(config_.layers) * part_.kv_heads, {});
    collect->queries.assign(collect->want_queries ? size_t(config_.layers) * part_.kv_heads : 0, {});
    collect->output_norms.assign(collect->want_output_norms ? size_t(config_.layers) * part_.kv_heads : 0, {});
  }
  const auto& c = config_;
  const auto& w = weights_;
  const int H = c.hidden, P = c.word_embed_proj_dim;
  checkTokens(c, tokens, positions, T);

  // embed: (T, P) -> (T, H). Vocab-parallel: a rank fills the rows of its vocabulary range,
  // zeros elsewhere, and the all-reduce assembles the full rows.
  std::vector<float> x(size_t(T) * H), xn(size_t(T) * H);
  {
    std::vector<float> e(size_t(T) * P, 0.0f);
    for (int t = 0; t < T; ++t)
      if (tokens[t] >= part_.vocab_begin && tokens[t] < part_.vocab_end)
        std::copy_n(w.embed.data() + (tokens[t] - part_.vocab_begin) * P, P, e.data() + int64_t(t) * P);
    if (part_.tp > 1) group_->allReduceSum(e.data(), e.size());
    if (c.hasProjection()) k::linear(e.data(), T, P, w.project_in.data(), H, nullptr, x.data());
    else x.swap(e);
    if (c.family == Family::Opt)  // learned positions, offset by 2 as OPT was trained
      for (int t = 0; t < T; ++t)
        k::addInPlace(x.data() + int64_t(t) * H, w.positions.data() + int64_t(positions[t] + 2) * H, H);
  }

  for (int l = 0; l < c.layers; ++l) {
    const auto& L = w.layers[l];
    if (c.family == Family::Llama) {
      k::rmsNorm(x.data(), T, H, L.attn_norm_w.data(), float(c.norm_eps), xn.data());
      attention(l, xn.data(), positions, T, cache, x.data(), collect);
      k::rmsNorm(x.data(), T, H, L.ffn_norm_w.data(), float(c.norm_eps), xn.data());
      mlp(l, xn.data(), T, x.data());
    } else if (c.pre_layer_norm) {
      k::layerNorm(x.data(), T, H, L.attn_norm_w.data(), L.attn_norm_b.data(), float(c.norm_eps), xn.data());
      attention(l, xn.data(), positions, T, cache, x.data(), collect);
      k::layerNorm(x.data(), T, H, L.ffn_norm_w.data(), L.ffn_norm_b.data(), float(c.norm_eps), xn.data());
      mlp(l, xn.data(), T, x.data());
    } else {  // OPT post-LN (opt-350m): norm after each residual add
      attention(l, x.data(), positions, T, cache, x.data(), collect);
      k::layerNorm(x.data(), T, H, L.attn_norm_w.data(), L.attn_norm_b.data(), float(c.norm_eps), x.data());
      xn = x;
      mlp(l, xn.data(), T, x.data());
      k::layerNorm(x.data(), T, H, L.ffn_norm_w.data(), L.ffn_norm_b.data(), float(c.norm_eps), x.data());
    }
  }

  if (!w.final_norm_w.empty()) {
    if (c.family == Family::Llama) k::rmsNorm(x.data(), T, H, w.final_norm_w.data(), float(c.norm_eps), x.data());
    else k::layerNorm(x.data(), T, H, w.final_norm_w.data(), w.final_norm_b.data(), float(c.norm_eps), x.data());
  }
  if (c.hasProjection()) {
    std::vector<float> out(size_t(T) * P);
    k::linear(x.data(), T, H, w.project_out.data(), P, nullptr, out.data());
    return out;
  }
  return x;
}

std::vector<double> Model::logprobs(const std::vector<float>& hidden, const int* targets, int T) const {
  // Vocab-parallel: each rank reduces its vocabulary range to per-row partials; the partials of
  // all ranks are gathered and combined in rank order, so every rank gets the same result and
  // the full vocabulary is never gathered.
  const int P = config_.word_embed_proj_dim, V = part_.vocab();
  constexpr int kRows = 64;
  std::vector<double> out(T);
  std::vector<float> logits(size_t(std::min(T, kRows)) * V);
  std::vector<k::SoftmaxPartial> mine(kRows), all(size_t(kRows) * part_.tp);
  for (int t0 = 0; t0 < T; t0 += kRows) {
    const int n = std::min(kRows, T - t0);
    k::linear(hidden.data() + int64_t(t0) * P, n, P, weights_.head().data(), V, nullptr, logits.data());
    k::softmaxPartials(logits.data(), n, V, int(part_.vocab_begin), targets + t0, mine.data());
    if (part_.tp == 1) {
      for (int i = 0; i < n; ++i) out[t0 + i] = mine[i].logprob();
      continue;
    }
    group_->allGather(mine.data(), sizeof(k::SoftmaxPartial) * kRows, all.data());
    for (int i = 0; i < n; ++i) {
      k::SoftmaxPartial p = all[i];
      for (int r = 1; r < part_.tp; ++r) p.combine(all[size_t(r) * kRows + i]);
      out[t0 + i] = p.logprob();
    }
  }
  return out;
}

std::vector<float> Model::logits(const float* hidden, int T) const {
  const int P = config_.word_embed_proj_dim, V = part_.vocab(), slot = vocabSlot(config_, part_.tp);
  std::vector<float> local(size_t(T) * V);
  k::linear(hidden, T, P, weights_.head().data(), V, nullptr, local.data());
  if (part_.tp == 1) return local;
  std::vector<float> mine(size_t(T) * slot), all(size_t(T) * slot * part_.tp);
  for (int t = 0; t < T; ++t) std::copy_n(local.begin() + int64_t(t) * V, V, mine.begin() + int64_t(t) * slot);
  group_->allGather(mine.data(), mine.size() * sizeof(float), all.data());
  return joinVocabSlices(config_, part_.tp, all.data(), T, slot);
}

}  // namespace kvtp
