#include "kv/policy.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "kernels/cpu_ops.h"
#include "kernels/splitmix.h"
#include "kv/budget_select.h"
#include "kv/scorers.h"

namespace kvtp::kv {

Policy::Policy(PolicySpec spec, HeadLayout layout, comm::Communicator* group)
    : spec_(spec), lay_(layout), group_(group) {}

void Policy::setQueryFilters(std::vector<std::vector<float>> filters) {
  if (filters.size() != size_t(lay_.layers) * lay_.local_kv_heads ||
      std::any_of(filters.begin(), filters.end(), [&](const auto& f) { return f.size() != size_t(lay_.head_dim); }))
    throw std::invalid_argument("query filters: one of head_dim values per layer and KV head");
  query_filters_ = std::move(filters);
}

int Policy::globalIndex(int layer, int h) const { return layer * lay_.global_kv_heads + lay_.kv_head_begin + h; }

void Policy::countStep(int last_pos, bool prefill) {
  if (prefill) prefill_end_ = last_pos + 1, decode_steps_ = 0;
  else ++decode_steps_;
}

Policy::DecodedBudget Policy::decodedBudget() const {
  return {spec_.decode != Decode::Discontinuous || decode_steps_ % spec_.delta == 0,
          spec_.decode == Decode::Slide ? spec_.decode_budget : spec_.decode_recent + decode_steps_ / spec_.delta,
          prefill_end_};
}

void Policy::afterStep(KVCache& cache, const StepAttention& attn, int last_pos, bool prefill) {
  if (spec_.method == Method::QFilters && query_filters_.empty())
    throw std::logic_error("qfilters: the policy was given no filters (setQueryFilters)");
  countStep(last_pos, prefill);
  // int8 is how a row is held from its step on (the device writes its codes as it appends it):
  // what reads the cached rows after the step's attention — row scores, low rank's projection —
  // reads the codes. KIVI waits for the decision: its runs are made of the rows kept.
  if (spec_.quant == Quant::Int8) quantize(cache);
  if (spec_.method == Method::SimLayerKV) {
    if (prefill) findLazyLayers(cache, attn);
    streamLazyLayers(cache, last_pos);
  } else {
    if (spec_.needsAttention()) score(cache, attn, prefill);
    if (spec_.method == Method::Expected) addQueries(attn, last_pos);
    if (spec_.needsOutputNorms()) addOutputNorms(cache, attn);
    if (spec_.evicts()) evict(cache, attn, last_pos, prefill);
    // A device's mirror holds no keys: the device prunes them (GpuEngine::pruneKeyChannels).
    if (prefill && spec_.think > 0 && !cache.rowsOnDevice()) pruneKeyChannels(cache, attn);
  }
  // A device's mirror: the device projects after this decision itself (GpuEngine::settleLowRank).
  if (spec_.rank && !cache.rowsOnDevice()) project(cache);
  if (spec_.quant == Quant::Kivi) quantize(cache);
}

// SCOPE's decode phase: the prompt's entries stay; decoded entries (position >= prefill_end_)
// get their own budget per head — the `decode_recent` newest kept, the rest chosen by the current
// step's attention. `slide`: a fixed budget; `adaptive`: it grows by one every `delta` steps;
// `discontinuous`: adaptive, compressing only every `delta` steps. Per head, as SCOPE does; a
// replicated head's scores were all-reduced, so every rank decides the same.
void Policy::evictDecoded(KVCache& cache, int last_pos) {
  const DecodedBudget b = decodedBudget();
  if (!b.decides) return;
  const int budget = b.per_head;
  for (int l = 0; l < lay_.layers; ++l)
    for (int h = 0; h < lay_.local_kv_heads; ++h) {
      const HeadCache& c = cache.head(l, h);
      std::vector<int> decoded;
      for (int i = 0; i < c.length(); ++i)
        if (c.positions[i] >= prefill_end_) decoded.push_back(i);
      if (int(decoded.size()) <= budget) continue;
      std::vector<uint8_t> keep(size_t(c.length()), 1);
      std::vector<int> candidates;
      for (int i : decoded)
        if (c.positions[i] <= last_pos - spec_.decode_recent) keep[i] = 0, candidates.push_back(i);
      std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return c.score[a] > c.score[b]; });
      const int room = budget - (int(decoded.size()) - int(candidates.size()));
      for (int k = 0; k < room && k < int(candidates.size()); ++k) keep[candidates[k]] = 1;
      std::vector<int> idx;
      for (int i = 0; i < c.length(); ++i)
        if (keep[i]) idx.push_back(i);
      cache.retain(l, h, idx);
    }
}

// SimLayerKV: a layer is lazy when its newest query puts more than `threshold` of its attention,
// averaged over all the layer's query heads (on every rank), on the sinks and the recent window.
// Each block row holds one unit of probability per query head summed into it, so the average is
// the ratio of two sums: the mass on sinks and recent, over the mass. Every rank adds its own
// query heads' rows (a replicated KV head's copies hold disjoint query heads), summed over the group.
void Policy::findLazyLayers(const KVCache& cache, const StepAttention& attn) {
  const int L = lay_.layers, H = lay_.local_kv_heads, T = attn.T;
  std::vector<double> mass(2 * size_t(L), 0.0);  // per layer: on sinks and recent, in all
  for (int l = 0; l < L && T > 0; ++l)
    for (int h = 0; h < H; ++h) {
      const HeadCache& c = cache.head(l, h);
      const int n = c.length(), last = c.positions.empty() ? 0 : c.positions.back();
      const float* row = attn.blocks[size_t(l) * H + h].data() + int64_t(T - 1) * n;
      for (int i = 0; i < n; ++i) {
        mass[2 * l + 1] += row[i];
        if (c.positions[i] < spec_.sinks || c.positions[i] > last - spec_.recent) mass[2 * l] += row[i];
      }
    }
  if (group_ && group_->size() > 1) group_->allReduceSum(mass.data(), mass.size());
  lazy_.assign(size_t(L), 0);
  for (int l = 0; l < L; ++l) lazy_[l] = mass[2 * l + 1] > 0 && mass[2 * l] / mass[2 * l + 1] > spec_.threshold;
}

// Lazy layers keep their sinks and recent window (StreamingLLM), after the prompt and every step.
void Policy::streamLazyLayers(KVCache& cache, int last_pos) {
  for (int l = 0; l < int(lazy_.size()); ++l) {
    if (!lazy_[l]) continue;
    for (int h = 0; h < lay_.local_kv_heads; ++h) {
      const HeadCache& c = cache.head(l, h);
      std::vector<int> idx;
      for (int i = 0; i < c.length(); ++i)
        if (c.positions[i] < spec_.sinks || c.positions[i] > last_pos - spec_.recent) idx.push_back(i);
      if (int(idx.size()) < c.length()) cache.retain(l, h, idx);
    }
  }
}

// Entries older than the full-rank window are cached as their low-rank coordinates.
void Policy::project(KVCache& cache) const {
  for (int l = 0; l < lay_.layers; ++l)
    for (int h = 0; h < lay_.local_kv_heads; ++h) cache.toLowRank(l, h, cache.head(l, h).length() - spec_.lowrank_window);
}

// Folds the step's attention into each entry's score. A replicated KV head sees only its local
// query heads' share, so the step's blocks are first summed over the ranks holding that head.
void Policy::score(KVCache& cache, const StepAttention& attn, bool prefill) {
  const int L = lay_.layers, H = lay_.local_kv_heads, T = attn.T;
  const bool replicated = lay_.replicated && group_ && group_->size() > 1;
  std::vector<std::vector<float>> summed;
  if (replicated) summed = sumOverReplicas(attn.blocks);
  const std::vector<std::vector<float>>& blocks = replicated ? summed : attn.blocks;
  // Heads are independent: in parallel (a decode step of a 7B model scores ~1M entries).
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      HeadCache& c = cache.head(l, h);
      const int n = c.length();
      const float* p = blocks[l * H + h].data();
      for (int t = 0; t < T; ++t) {
        const float* row = p + int64_t(t) * n;
        if (spec_.method == Method::Scissorhands) {  // one history bit per query that sees it: above the average?
          appendHistoryBits(row, n, c.history.data());
          continue;
        }
        for (int i = 0; i < n; ++i) {
          switch (spec_.method) {
            case Method::H2O: c.score[i] += row[i]; break;
            case Method::TOVA:  // the newest query's attention alone (TOVA: the last token's)
              if (t == T - 1) c.score[i] = row[i];
              break;
            case Method::SnapKV:
            case Method::PyramidKV:  // only the prefill's last `window` queries observe; then SCOPE
              if (prefill && t >= T - spec_.window) c.score[i] += row[i];
              if (!prefill && spec_.decode != Decode::None) c.score[i] = row[i];  // this step's attention
              break;
            case Method::Finch:  // the window's rows, each weighted by the keys before it (kvpress's normalization)
              if (prefill && t >= T - spec_.window) c.score[i] += double(row[i]) * (n - T + t);
              break;
            default: break;
          }
        }
      }
    }
}

void Policy::sumOverReplicas(std::vector<float>& flat, int width) const {
  std::vector<std::vector<float>> blocks(flat.size() / size_t(width));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i].assign(flat.begin() + i * width, flat.begin() + (i + 1) * width);
  blocks = sumOverReplicas(blocks);
  for (size_t i = 0; i < blocks.size(); ++i) std::copy(blocks[i].begin(), blocks[i].end(), flat.begin() + i * width);
}

std::vector<std::vector<float>> Policy::sumOverReplicas(const std::vector<std::vector<float>>& blocks) const {
  if (!lay_.replicated || !group_ || group_->size() == 1) return blocks;
  const int L = lay_.layers, H = lay_.local_kv_heads;
  // Global layout: one slot per (layer, global KV head), as long as its holders' blocks (the
  // holders of a head have blocks of one size); non-holders add 0.
  std::vector<double> sizes(size_t(L) * lay_.global_kv_heads, 0.0);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) sizes[globalIndex(l, h)] = double(blocks[size_t(l) * H + h].size());
  group_->allReduceMax(sizes.data(), sizes.size());
  std::vector<int64_t> off(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) off[i + 1] = off[i] + int64_t(sizes[i]);
  std::vector<float> all(size_t(off.back()), 0.0f);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const auto& b = blocks[l * H + h];
      std::copy(b.begin(), b.end(), all.begin() + off[globalIndex(l, h)]);
    }
  group_->allReduceSum(all.data(), all.size());
  std::vector<std::vector<float>> summed(blocks.size());
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const int g = globalIndex(l, h);
      summed[l * H + h].assign(all.begin() + off[g], all.begin() + off[g + 1]);
    }
  return summed;
}

// Expected attention: each step's queries at positions past the sinks join their head's statistics.
void Policy::addQueries(const StepAttention& attn, int last_pos) {
  const int hd = lay_.head_dim;
  queries_.resize(attn.queries.size());
  for (size_t i = 0; i < attn.queries.size(); ++i) {
    const std::vector<float>& q = attn.queries[i];
    const int members = int(q.size() / (size_t(attn.T) * hd));
    queries_[i].resize(size_t(members));
    for (int m = 0; m < members; ++m)
      for (int t = 0; t < attn.T; ++t)
        if (last_pos - attn.T + 1 + t >= spec_.sinks) queries_[i][m].add(q.data() + (int64_t(m) * attn.T + t) * hd, hd);
  }
}

// noncausal (Compactor's non-causal chunked attention) and compactor at the prompt's end: the
// attention each entry receives from its chunk's queries, summed over the KV head's query heads
// (over the ranks, for a replicated head), then nonCausalScores; compactor adds `blend` times the
// leverage z-score (kvpress's CompactorPress: blend = the compression ratio, 1 - budget).
std::vector<std::vector<double>> Policy::nonCausalKeys(const KVCache& cache, const StepAttention& prompt) {
  if (spec_.method != Method::NonCausal && spec_.method != Method::Compactor) return {};
  const int L = lay_.layers, H = lay_.local_kv_heads, hd = lay_.head_dim;
  auto eachHead = [&](auto&& f) {  // f(head's cache, its rows, its index), the heads in parallel
#pragma omp parallel for collapse(2) schedule(static)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        std::vector<float> scratch;
        f(cache.head(l, h), cache.rows(l, h, scratch), size_t(l) * H + h);
      }
  };
  std::vector<std::vector<float>> attention(size_t(L) * H);
  eachHead([&](const HeadCache& c, const HeadRows& rows, size_t i) {
    std::vector<double> a(size_t(c.length()), 0.0);
    if (i < prompt.queries.size())
      nonCausalAttention(rows, c.positions.data(), c.length(), hd, prompt.queries[i], prompt.T, cache.ropeInvFreq(),
                         spec_.span, a.data());
    attention[i].assign(a.begin(), a.end());
  });
  attention = sumOverReplicas(attention);
  const double blend = spec_.blend >= 0                                     ? spec_.blend
                       : spec_.budget_tokens > 0 || spec_.budget_bytes > 0 ? 0.35  // kvpress's when no ratio is set
                                                                            : 1 - spec_.budget;
  std::vector<std::vector<double>> out(size_t(L) * H);
  eachHead([&](const HeadCache& c, const HeadRows& rows, size_t i) {
    const std::vector<double> a(attention[i].begin(), attention[i].end());
    out[i].resize(size_t(c.length()));
    nonCausalScores(rows, c.length(), hd, a.data(), out[i].data());
    if (spec_.method != Method::Compactor) return;
    std::vector<double> leverage(size_t(c.length()));
    leverageScores(rows, c.positions.data(), c.length(), hd, cache.ropeInvFreq(), leverage.data());
    for (int j = 0; j < c.length(); ++j) out[i][j] += blend * leverage[j];
  });
  return out;
}

// ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"; kvpress's ThinKPress)
// at the prompt's end: in each KV head, channel c scores the mean of q_c^2 over the prompt's last
// `window` queries (RoPE applied; the head's query heads, over the ranks for a replicated head)
// times the mean of k_c^2 over its cached keys; the floor(think x head_dim) lowest (ties to the
// lower channel) are zeroed in the prompt's keys, which a runtime then stores without them.
// Tokens decoded later keep every channel, as in kvpress.
void Policy::pruneKeyChannels(KVCache& cache, const StepAttention& prompt) {
  const int L = lay_.layers, H = lay_.local_kv_heads, hd = lay_.head_dim, pruned = int(spec_.think * hd);
  if (pruned == 0) return;
  const std::vector<float>& rope = cache.ropeInvFreq();
  std::vector<std::vector<float>> query_power(size_t(L) * H, std::vector<float>(size_t(hd), 0.0f));
  const int T = prompt.T;
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const size_t i = size_t(l) * H + h;
      if (i >= prompt.queries.size() || T == 0) continue;
      const std::vector<float>& q = prompt.queries[i];
      const int members = int(q.size() / (size_t(T) * hd));
      std::vector<double> sum(static_cast<size_t>(hd), 0.0);
      std::vector<float> row(static_cast<size_t>(hd));
      for (int m = 0; m < members; ++m)
        for (int t = std::max(0, T - spec_.window); t < T; ++t) {
          std::copy_n(q.data() + (int64_t(m) * T + t) * hd, hd, row.data());
          const int position = prefill_end_ - T + t;
          if (!rope.empty()) kernels::applyRope(row.data(), 1, 1, hd, &position, rope.data());
          for (int c = 0; c < hd; ++c) sum[c] += double(row[c]) * row[c];
        }
      query_power[i].assign(sum.begin(), sum.end());
    }
  query_power = sumOverReplicas(query_power);
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      HeadCache& c = cache.head(l, h);
      std::vector<double> score(size_t(hd), 0.0);
      for (int e = 0; e < c.length(); ++e)
        for (int ch = 0; ch < hd; ++ch) score[ch] += double(c.keys[int64_t(e) * hd + ch]) * c.keys[int64_t(e) * hd + ch];
      for (int ch = 0; ch < hd; ++ch) score[ch] *= query_power[size_t(l) * H + h][ch];
      std::vector<int> order(static_cast<size_t>(hd));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] < score[b]; });
      for (int e = 0; e < c.length(); ++e)
        for (int k = 0; k < pruned; ++k) c.keys[int64_t(e) * hd + order[k]] = 0.0f;
    }
}

void Policy::rowScores(int layer, int local_head, const HeadRows& rows, const int* positions, int n,
                       const std::vector<float>& rope_inv_freq, double* key) const {
  const int hd = lay_.head_dim;
  if (spec_.method == Method::QFilters)
    queryFilterScores(rows, n, hd, query_filters_[size_t(layer) * lay_.local_kv_heads + local_head].data(), key);
  if (spec_.method == Method::KNorm) keyNormScores(rows, n, hd, key);
  if (spec_.method == Method::KeyDiff) keyDiffScores(rows, n, hd, key);
  if (spec_.method == Method::LagKV) lagScores(rows, n, hd, spec_.sinks, spec_.lag, key);
  if (spec_.method == Method::Leverage) leverageScores(rows, positions, n, hd, rope_inv_freq, key);
  if (spec_.method == Method::CUR) curScores(rows, n, hd, spec_.local, key);
}

// Block-wise prompt compression (the KeyDiff paper's block prompt processing, kvpress's
// BlockPress): each head starts from its first `share` entries (its share of its pool's budget),
// then takes the next `block` entries at a time, scored together with those it kept, and the
// budget's select keeps as many as the pool allows — so each decision sees a block and what
// survived before it, not the whole prompt. Leaves the decision in keep_.
void Policy::evictInBlocks(const KVCache& cache, int last_pos, const std::vector<int64_t>& pool_budget,
                           const std::vector<int>& pool_of, bool shared) {
  const int L = lay_.layers, H = lay_.local_kv_heads, hd = lay_.head_dim;
  std::vector<std::vector<int>> kept(size_t(L) * H);  // entry indices per head, ascending
  std::vector<int> next(size_t(L) * H);                 // each head's first entry not yet seen
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const size_t i = size_t(l) * H + h;
      next[i] = int(std::min<int64_t>(cache.head(l, h).length(), headShare(pool_budget, pool_of, l, h)));
      for (int e = 0; e < next[i]; ++e) kept[i].push_back(e);
    }
  std::vector<std::vector<double>> keys(size_t(L) * H);
  std::vector<SelectHead> heads(size_t(L) * H);
  std::vector<std::vector<int>> candidates(size_t(L) * H);
  // Every rank takes as many blocks as the longest head needs (a head with none left re-decides
  // what it kept), so that the collectives match.
  int64_t longest = 0;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) longest = std::max<int64_t>(longest, cache.head(l, h).length() - next[size_t(l) * H + h]);
  if (shared) {
    double x = double(longest);
    group_->allReduceMax(&x, 1);
    longest = int64_t(x);
  }
  for (int64_t done = 0; done < longest; done += spec_.block) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const size_t i = size_t(l) * H + h;
        const HeadCache& c = cache.head(l, h);
        std::vector<int>& cand = candidates[i];
        cand = kept[i];
        for (int e = next[i]; e < std::min(c.length(), next[i] + spec_.block); ++e) cand.push_back(e);
        next[i] = std::min(c.length(), next[i] + spec_.block);
        std::vector<float> scratch, k(cand.size() * hd), v(cand.size() * hd);
        const HeadRows rows = cache.rows(l, h, scratch);
        std::vector<int> pos(cand.size());
        for (size_t j = 0; j < cand.size(); ++j) {
          std::copy_n(rows.keys + int64_t(cand[j]) * hd, hd, k.begin() + int64_t(j) * hd);
          std::copy_n(rows.values + int64_t(cand[j]) * hd, hd, v.begin() + int64_t(j) * hd);
          pos[j] = c.positions[cand[j]];
        }
        keys[i].assign(cand.size(), 0.0);
        rowScores(l, h, {k.data(), v.data()}, pos.data(), int(cand.size()), cache.ropeInvFreq(), keys[i].data());
        for (size_t j = 0; j < cand.size(); ++j)
          if (pos[j] < spec_.sinks || pos[j] > last_pos - spec_.recent) keys[i][j] = INFINITY;
        heads[i] = {keys[i].data(), int(cand.size()), globalIndex(l, h), lay_.owner || !shared};
      }
    last_traffic_ = selectBudget(heads, pool_of, pool_budget, shared ? group_ : nullptr, keep_);
    for (size_t i = 0; i < kept.size(); ++i) {
      kept[i].clear();
      for (size_t j = 0; j < candidates[i].size(); ++j)
        if (keep_[i][j]) kept[i].push_back(candidates[i][j]);
    }
  }
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {  // the decision as evict() takes it: a flag per entry of the head
      const size_t i = size_t(l) * H + h;
      keep_[i].assign(size_t(cache.head(l, h).length()), 0);
      for (int e : kept[i]) keep_[i][size_t(e)] = 1;
    }
}

// The step's tokens are each head's last T entries (the policy has not decided since they came);
// a replicated KV head's query heads are on several ranks, so their norms are summed first.
void Policy::addOutputNorms(KVCache& cache, const StepAttention& attn) {
  const int L = lay_.layers, H = lay_.local_kv_heads;
  const std::vector<std::vector<float>> norms = sumOverReplicas(attn.output_norms);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const std::vector<float>& n = norms.at(size_t(l) * H + h);
      HeadCache& c = cache.head(l, h);
      if (n.size() > c.out_norm.size())
        throw std::logic_error("Policy::addOutputNorms: " + std::to_string(n.size()) + " norms for a head of " +
                               std::to_string(c.out_norm.size()) + " entries");
      std::copy(n.begin(), n.end(), c.out_norm.end() - int64_t(n.size()));
    }
}

void Policy::criticalKeys(const HeadCache& c, int first, std::vector<double>& key) {
  constexpr double kEpsilon = 1e-4;  // kvpress's
  std::vector<int> order;
  for (int i = 0; i < c.length(); ++i)
    if (key[i] != INFINITY) order.push_back(i);
  first = std::min(first, int(order.size()));
  std::partial_sort(order.begin(), order.begin() + first, order.end(),
                    [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  for (size_t r = 0; r < order.size(); ++r) {
    const int i = order[r];
    key[i] = int(r) < first ? std::numeric_limits<double>::max() : (key[i] + kEpsilon) * c.out_norm[i];
  }
}

int Policy::poolCount() const {
  const int L = lay_.layers, G = lay_.global_kv_heads;
  return spec_.scope == Scope::Global ? 1 : spec_.scope == Scope::Layer ? L : L * G;
}

std::vector<int> Policy::poolOfTableHeads() const {
  const int L = lay_.layers, G = lay_.global_kv_heads;
  std::vector<int> pool_of(size_t(L) * G);
  for (int l = 0; l < L; ++l)
    for (int gh = 0; gh < G; ++gh)
      pool_of[size_t(l) * G + gh] = spec_.scope == Scope::Global ? 0 : spec_.scope == Scope::Layer ? l : l * G + gh;
  return pool_of;
}

int64_t Policy::headShare(const std::vector<int64_t>& pool_budget, const std::vector<int>& pool_of, int layer,
                          int local_head) const {
  const int heads_per_pool = lay_.layers * lay_.global_kv_heads / poolCount();
  return pool_budget[size_t(pool_of[size_t(globalIndex(layer, local_head))])] / heads_per_pool;
}

std::vector<int64_t> Policy::budgets(int last_pos) const {
  const int L = lay_.layers, G = lay_.global_kv_heads, pools = poolCount();
  // Entries per head on average. A byte budget is counted at the full-precision entry size (fp16
  // key + value + position), so a quantized cache stays within it.
  const double entry_bytes = 2.0 * lay_.head_dim * 2 + 4;
  const double per_head = spec_.budget_bytes > 0 ? spec_.budget_bytes / entry_bytes / (double(L) * G)
                          : spec_.budget_tokens > 0 ? double(spec_.budget_tokens)
                                                    : spec_.budget * (last_pos + 1);
  std::vector<int64_t> budget(pools);
  for (int p = 0; p < pools; ++p) {
    const int heads_in_pool = spec_.scope == Scope::Global ? L * G : spec_.scope == Scope::Layer ? G : 1;
    double share = per_head * heads_in_pool;
    if (spec_.method == Method::PyramidKV && L > 1) {
      // Layer budgets fall linearly from ratio x to 1 x, scaled so that they sum to the total.
      const double r = spec_.pyramid_ratio, w = r - (r - 1) * double(p) / (L - 1);
      share *= w * L / (L * (r + 1) / 2.0);
    }
    budget[p] = int64_t(std::ceil(share));
  }
  return budget;
}

void Policy::evict(KVCache& cache, const StepAttention& attn, int last_pos, bool prefill) {
  // SnapKV, PyramidKV, noncausal and compactor compress the prompt once, at the end of the
  // prefill; the tokens decoded after it are all kept (SCOPE's "prefill-only" setting).
  const bool once = spec_.promptOnce();
  if (once && !prefill) {
    if (spec_.decode != Decode::None) evictDecoded(cache, last_pos);
    return;
  }
  if (!once && !decidesAfter(prefill)) return;
  const int L = lay_.layers, H = lay_.local_kv_heads, G = lay_.global_kv_heads;
  // A pool per head lies on one rank (or is replicated alike): decided locally; wider pools
  // over the group (kv/budget_select.h).
  const bool shared = group_ && group_->size() > 1 && spec_.scope != Scope::Head;
  keys_.resize(size_t(L) * H);
  std::vector<SelectHead> heads(size_t(L) * H);
  const std::vector<int64_t> pool_budget = budgets(last_pos);
  const std::vector<int> pool_of = poolOfTableHeads();
  if (prefill && spec_.block > 0) {
    evictInBlocks(cache, last_pos, pool_budget, pool_of, shared);
    return retainKept(cache);
  }
  // Expected attention sums over a KV head's query heads, which a replicated head has on several ranks.
  std::vector<std::vector<float>> expected;
  if (spec_.method == Method::Expected) {
    expected.resize(size_t(L) * H);
#pragma omp parallel for collapse(2) schedule(static)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const HeadCache& c = cache.head(l, h);
        std::vector<float> scratch;
        std::vector<double> s(size_t(c.length()));
        const size_t i = size_t(l) * H + h;
        expectedAttentionScores(cache.rows(l, h, scratch), c.positions.data(), c.length(), lay_.head_dim,
                                i < queries_.size() ? queries_[i] : std::vector<QueryStats>{}, cache.ropeInvFreq(),
                                last_pos + 1, spec_.future, spec_.sinks, s.data());
        expected[i].assign(s.begin(), s.end());
      }
    expected = sumOverReplicas(expected);
  }
  std::vector<std::vector<double>> noncausal = nonCausalKeys(cache, attn);
  // Each entry's key: +inf for the protected (sinks, recent window), else the method's score.
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const HeadCache& c = cache.head(l, h);
      std::vector<double>& key = keys_[size_t(l) * H + h];
      key.resize(size_t(c.length()));
      if (spec_.readsRows()) {  // scores of the cached keys and values (dequantized where stored coded)
        std::vector<float> scratch;
        rowScores(l, h, cache.rows(l, h, scratch), c.positions.data(), c.length(), cache.ropeInvFreq(), key.data());
      } else {
        for (int i = 0; i < c.length(); ++i) {
          double s = c.score[i];
          if (spec_.method == Method::StreamingLLM) s = c.positions[i];  // keep the most recent
          if (spec_.method == Method::Random) s = kernels::entryDraw(spec_.seed, l, lay_.kv_head_begin + h, c.positions[i]);
          if (spec_.method == Method::Expected) s = expected[size_t(l) * H + h][i];
          if (!noncausal.empty()) s = noncausal[size_t(l) * H + h][i];
          if (spec_.method == Method::Scissorhands) {
            const uint64_t mask = spec_.history >= 64 ? ~0ull : ((1ull << spec_.history) - 1);
            s = std::popcount(c.history[i] & mask);
          }
          key[i] = s;
        }
      }
      if (spec_.chunk > 1) chunkMeans(key, spec_.chunk);  // ChunkKV: each chunk of consecutive entries shares its mean
      if (spec_.method == Method::SnapKV || spec_.method == Method::PyramidKV) maxPool(key, spec_.kernel);
      // Finch keeps its observation window (the question, in its paper) whole.
      const int recent = spec_.method == Method::Finch ? std::max(spec_.recent, spec_.window) : spec_.recent;
      for (int i = 0; i < c.length(); ++i)
        if (c.positions[i] < spec_.sinks || c.positions[i] > last_pos - recent) key[i] = INFINITY;
      if (spec_.critical > 0)  // the first stage: this head's share of its pool's budget
        criticalKeys(c, int(spec_.critical * double(headShare(pool_budget, pool_of, l, h))), key);
      heads[size_t(l) * H + h] = {key.data(), c.length(), globalIndex(l, h), lay_.owner || !shared};
    }
  if (!spec_.ladder.empty()) return settleLadder(cache, heads, pool_of, last_pos, shared);
  last_traffic_ = selectBudget(heads, pool_of, pool_budget, shared ? group_ : nullptr, keep_);
  retainKept(cache);
}

// Each head keeps the entries keep_ flags (and, DMS-style, none whose key is below evict_below).
void Policy::retainKept(KVCache& cache) {
  const int L = lay_.layers, H = lay_.local_kv_heads;
#pragma omp parallel for collapse(2) schedule(static)
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {  // each head retains its own entries
      std::vector<uint8_t>& k = keep_[size_t(l) * H + h];
      if (spec_.evict_below > -INFINITY) {  // below the threshold, out whatever the budget
        const std::vector<double>& key = keys_[size_t(l) * H + h];
        for (size_t i = 0; i < k.size(); ++i)
          if (key[i] < spec_.evict_below) k[i] = 0;
      }
      if (std::find(k.begin(), k.end(), 0) == k.end()) continue;
      std::vector<int> idx;
      for (int i = 0; i < int(k.size()); ++i)
        if (k[i]) idx.push_back(i);
      cache.retain(l, h, idx);
    }
}

// int8: every entry, per token. KIVI: entries older than the residual window, keys per channel
// over groups of `group` consecutive entries, values per token over groups of `group` channels.
void Policy::quantize(KVCache& cache) const {
  // A device's mirror: the device quantizes KIVI's runs itself after this decision (GpuEngine::settleKivi).
  if (spec_.quant == Quant::Kivi && cache.rowsOnDevice()) return;
  for (int l = 0; l < lay_.layers; ++l)
    for (int h = 0; h < lay_.local_kv_heads; ++h) {
      if (spec_.quant == Quant::Int8) {
        cache.quantizeInt8(l, h);
        continue;
      }
      const HeadCache& c = cache.head(l, h);
      const int old = std::max(0, c.length() - spec_.residual);  // entries [0, old) left the residual window
      std::vector<int> pending;
      std::vector<std::vector<int>> runs;
      for (int i = 0; i < old; ++i)
        if (c.form[i] == Form::Full) pending.push_back(i);
      for (size_t g = 0; g + spec_.group <= pending.size(); g += spec_.group) {
        const int first = pending[g], last = pending[g + spec_.group - 1];
        if (last - first + 1 != spec_.group) continue;  // a hole from eviction: wait for a clean group
        runs.emplace_back(pending.begin() + g, pending.begin() + g + spec_.group);
      }
      if (!runs.empty()) cache.quantizeKivi(l, h, runs, spec_.bits, spec_.group);
    }
}

// Bytes as stored (kv/kv_cache.h), plus a 4-byte position per entry once tokens are evicted;
// ThinK: the prompt's keys without their pruned channels (2 bytes each, as a full entry counts).
KvBytes Policy::bytes(const KVCache& cache, int tokens_seen) const {
  KvBytes b;
  b.full = fullCacheBytes(tokens_seen, lay_.layers, lay_.local_kv_heads, lay_.head_dim);
  const int pruned = int(spec_.think * lay_.head_dim);
  for (int l = 0; l < lay_.layers; ++l)
    for (int h = 0; h < lay_.local_kv_heads; ++h) {
      const HeadCache& c = cache.head(l, h);
      b.stored += cache.storedBytes(l, h) + (spec_.evicts() ? 4 * int64_t(c.length()) : 0);
      if (pruned > 0)
        b.stored -= 2 * int64_t(pruned) * (std::lower_bound(c.positions.begin(), c.positions.end(), prefill_end_) -
                                            c.positions.begin());
    }
  return b;
}

}  // namespace kvtp::kv
