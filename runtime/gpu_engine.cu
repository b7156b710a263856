// The CUDA engine (gpu_engine.h): model.cpp's forward pass on the kernels of kernels/cuda/.
// Activations: the residual stream x stays float32; what feeds a matrix product (normed rows,
// attention output, MLP activations) is stored in T; every product accumulates in float32. A
// Llama decode step on one GPU defers each RMSNorm into the products around it (cuda::DeferredNorm).
#include "runtime/gpu_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <functional>
#include <set>
#include <type_traits>
#include <vector>

#include "comm/nccl_communicator.h"
#include "kernels/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/eviction.h"
#include "kernels/cuda/forward_ops.h"
#include "runtime/error.h"
#include "runtime/partition.h"

namespace kvtp {
namespace {

using cuda::DeviceBuffer;
using cuda::grow;
using cuda::growWithHeadroom;

// Whether a policy's every decision stays on the host mirror: low rank (the device's decisions
// read rows where they lie, not coordinates), CriticalKV's second stage, ThinK's bytes and a
// ladder's forms are the policy's own.
bool mirrorDecidesAll(const kv::PolicySpec& s) {
  return s.rank > 0 || s.critical > 0 || s.think > 0 || !s.ladder.empty();
}

// The storage the host holds (tiered precision's mixed forms; low rank with KIVI, whose rows end in
// one form or the other): the mirror is a whole kv::KVCache — the step's new rows copied down into
// it — that converts its entries with the CPU's code, and the device keeps every entry's values at
// full precision, each entry the mirror converts written back decoded (GpuEngine::writeConverted).
// The bytes are counted as the mirror stores them; the device saves none of them (a decode
// attention over rows of mixed forms is not written).
bool hostHoldsForms(const kv::PolicySpec& s) {
  return !s.ladder.empty() || (s.rank > 0 && s.quant == kv::Quant::Kivi);
}

// The methods the device does not score (leverage, expected attention, noncausal, compactor;
// block-wise prompts; every row-reading method over low rank, whose decisions are all the
// mirror's) decide on the mirror from the cached rows as the device holds them, copied down for
// each decision (GpuEngine::copyRowsToMirror) — and, for those that read them, from the step's
// queries (PolicySpec::scoresByQueries, GpuEngine::stepQueries). Block-wise prompts of the
// methods the device scores go back to the device after the prompt.
bool mirrorReadsRows(const kv::PolicySpec& s) {
  return s.scoresByQueries() || s.method == kv::Method::Leverage || ((s.block > 0 || s.rank > 0) && s.readsRows());
}

// Host float32 tensors, concatenated by rows, converted to T on the device (through a float32
// staging buffer, so a 7B model converts in seconds).
template <class T>
DeviceBuffer<T> upload(const std::vector<const Tensor*>& parts, DeviceBuffer<float>& staging) {
  size_t n = 0;
  for (auto* p : parts) n += p->size();
  DeviceBuffer<T> out(n);
  size_t at = 0;
  for (auto* p : parts) {
    constexpr size_t kChunk = size_t(1) << 26;
    for (size_t off = 0; off < p->size(); off += kChunk) {
      const size_t len = std::min(kChunk, p->size() - off);
      float* s = grow(staging, kChunk);
      KVTP_CUDA_CHECK(cudaMemcpy(s, p->data() + off, len * sizeof(float), cudaMemcpyHostToDevice));
      cuda::convert(s, int64_t(len), out.get() + at + off);
    }
    at += p->size();
  }
  KVTP_CUDA_CHECK(cudaDeviceSynchronize());
  return out;
}

DeviceBuffer<float> uploadFloat(const Tensor& t) { return t.empty() ? DeviceBuffer<float>() : DeviceBuffer<float>(t); }

// Biases of fused projections: the parts' biases side by side (zeros for a part without one);
// empty when no part has one.
DeviceBuffer<float> fusedBias(const std::vector<std::pair<const Tensor*, size_t>>& parts) {
  bool any = false;
  for (auto& [b, rows] : parts) any |= !b->empty();
  if (!any) return {};
  Tensor all;
  for (auto& [b, rows] : parts) {
    if (b->empty()) all.insert(all.end(), rows, 0.0f);
    else all.insert(all.end(), b->begin(), b->end());
  }
  return DeviceBuffer<float>(all);
}

template <class T>
struct GpuLayer {
  DeviceBuffer<float> attn_norm_w, attn_norm_b, ffn_norm_w, ffn_norm_b;
  DeviceBuffer<T> wqkv, wo, w_in, w_down;  // w_in: Llama gate|up (2F, H), OPT fc1 (F, H)
  DeviceBuffer<float> bqkv, bo, b_in, b_down;
  DeviceBuffer<T> K, V;    // the KV cache: [kv_head][capacity][head_dim]
  DeviceBuffer<int> pos;  // the cached rows' positions: [kv_head][capacity]
  // An int8 cache instead of K, V: codes [kv_head][capacity][head_dim], steps [kv_head][capacity].
  DeviceBuffer<int8_t> K8, V8;
  DeviceBuffer<float> k_step, v_step;
  // A KIVI cache instead (cuda::KiviCache): codes [kv_head][code capacity][code bytes], key (lo, step)
  // [kv_head][code capacity / group + 1][head_dim], value (lo, step) [kv_head][code capacity][value
  // groups] (pairs of T: cuda::AffinePair), the newest rows at full precision in a ring
  // [kv_head][ring][head_dim]. The code capacity is the capacity, but under eviction the coded rows
  // the heads keep (GpuEngine::code_capacity_): there each coded row's run [kv_head][code capacity],
  // and the key pairs sized by the runs held (GpuEngine::run_capacity_): eviction thins runs.
  DeviceBuffer<uint8_t> Kq, Vq;
  DeviceBuffer<cuda::AffinePair<T>> k_params, v_params;
  DeviceBuffer<int> k_run;
  DeviceBuffer<T> ring_k, ring_v;
  // A low-rank cache instead (cuda::LowRankCache): coordinates [kv_head][capacity][2 rank], the ring
  // as KIVI's; the layer's bases [kv_head][head_dim][rank] (weights: they stay).
  DeviceBuffer<T> coords, key_basis, value_basis;
  void dropCache() {
    K = {}, V = {}, pos = {}, K8 = {}, V8 = {}, k_step = {}, v_step = {}, Kq = {}, Vq = {}, k_params = {},
    v_params = {}, k_run = {}, ring_k = {}, ring_v = {}, coords = {};
  }
};

// One sequence of the batch as the host tracks it; the device holds every sequence's KV heads side
// by side, [sequence][kv_head][capacity].
struct Sequence {
  // bases: low rank's, for a mirror that holds the rows (hostHoldsForms); rank 0 otherwise.
  // filters: Q-Filters' (queryFiltersFor), for a policy that decides on the mirror.
  Sequence(const ModelConfig& c, const Partition& part, const kv::PolicySpec& spec, comm::Communicator* host_group,
           const kv::LowRankBases& bases, const std::vector<std::vector<float>>& filters)
      : len(size_t(c.layers) * part.kv_heads, 0), policy(spec, headLayout(c, part), host_group),
        mirror(c.layers, part.kv_heads, c.head_dim, !hostHoldsForms(spec)), row_positions(len.size()),
        coded(len.size(), 0), coded_kept(len.size(), 0), runs_alive(len.size(), 0), next_run(len.size(), 0) {
    if (c.family == Family::Llama) mirror.setRope(ropeInverseFrequencies(c));  // what reads keys before RoPE
    if (bases.rank > 0) mirror.setLowRank(bases);
    if (spec.method == kv::Method::QFilters) policy.setQueryFilters(filters);
  }
  std::vector<int> len;  // slots in use per (layer, KV head): its entries (and, decided on the device, holes)
  int longest = 0;
  // While no eviction has run this window every head holds the same positions, `positions`.
  bool uniform = true;
  std::vector<int> positions;
  // Compression: the policy, the host mirror it decides on, each (layer, KV head)'s device rows'
  // positions; whether the last decode step left probabilities for the policy (GpuEngine::weights_).
  kv::Policy policy;
  kv::KVCache mirror;
  std::vector<std::vector<int32_t>> row_positions;
  bool weights_pending = false;
  // The latest step's rows until its compress(): low rank over int8 counts them at full
  // precision until then, as the CPU, which quantizes them in kv::Policy::afterStep (kvBytes).
  int step_rows = 0;
  // Rows appended since the last compress(), and whether this window's decode steps are decided
  // on the device (GpuEngine::decideOnDevice; the mirror then stops following the cache).
  int unscored = 0;
  bool on_device = false;
  std::vector<int> kept;  // on the device: entries per (layer, KV head) after its last decision
  std::vector<int> prompt_kept;  // SCOPE: the prompt's entries per (layer, KV head), decided once
  // KIVI or low rank: rows held in the compact form (codes, coordinates) in every head (no
  // eviction, so every head alike) — on the device, and as counted by kvBytes (the CPU converts in
  // compress(), the device in the step itself).
  int compact = 0, compact_counted = 0;
  // KIVI or low rank under eviction, per (layer, KV head): coded slots (KIVI's codes or low rank's
  // coordinates, holes included), the coded entries kept, KIVI's runs with a kept row, and the run
  // the next quantized one takes (runtime/gpu_windowed.cuh).
  std::vector<int> coded, coded_kept, runs_alive, next_run;
};

template <class T>
class GpuEngine : public Engine {
 public:
  GpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source, const GpuOptions& o)
      : c_(config), part_(part), group_(o.device_group), kv_spec_(o.kv), host_group_(o.host_group),
        device_decides_((o.kv.method == kv::Method::H2O || o.kv.method == kv::Method::Scissorhands ||
                         o.kv.method == kv::Method::StreamingLLM || o.kv.method == kv::Method::KNorm ||
                         o.kv.method == kv::Method::KeyDiff || o.kv.method == kv::Method::QFilters ||
                         o.kv.method == kv::Method::TOVA || o.kv.method == kv::Method::Random ||
                         o.kv.method == kv::Method::LagKV || o.kv.method == kv::Method::CUR ||
                         o.kv.method == kv::Method::SnapKV || o.kv.method == kv::Method::PyramidKV) &&
                        !mirrorDecidesAll(o.kv)),
        device_decides_decoded_((o.kv.method == kv::Method::SnapKV || o.kv.method == kv::Method::PyramidKV) &&
                                o.kv.decode != kv::Decode::None && !mirrorDecidesAll(o.kv)),
        host_forms_(hostHoldsForms(o.kv)),
        int8_(o.kv.quant == kv::Quant::Int8 && o.kv.rank == 0 && !host_forms_),
        kivi_(o.kv.quant == kv::Quant::Kivi && !host_forms_), lowrank_(o.kv.rank > 0 && !host_forms_),
        windowed_(kivi_ || lowrank_), windowed_evicts_(windowed_ && o.kv.evicts()), kivi_evicts_(kivi_ && o.kv.evicts()),
        ring_((lowrank_ ? o.kv.lowrank_window : o.kv.residual + o.kv.group) + kMaxFewRows),
        time_collectives_(o.time_collectives), time_phases_(o.time_decision_phases) {
    c_.checkLowRank(o.kv.rank);
    if (!std::set<int>{8, 16, 32, 64, 128, 256}.count(c_.head_dim))
      throw Error("the CUDA backend needs head_dim 8, 16, 32, 64, 128 or 256 (this model: " +
                  std::to_string(c_.head_dim) + ")");
    if (part_.tp > 1 && (!group_ || group_->size() != part_.tp))
      throw Error("the CUDA engine at tp " + std::to_string(part_.tp) + " needs a device communicator of that size");
    KVTP_CUDA_CHECK(cudaSetDevice(o.device));
    if (kv_spec_.method == kv::Method::QFilters) {
      if (o.query_filters.size() != size_t(c_.layers) * part_.kv_heads)
        throw Error("qfilters on the GPU: the engine was given no filters (queryFiltersFor)");
      std::vector<float> flat;
      for (const auto& f : o.query_filters) flat.insert(flat.end(), f.begin(), f.end());
      query_filters_ = DeviceBuffer<float>(flat);
      mirror_filters_ = o.query_filters;
    }
    // The model-level tensors, then one layer at a time: the host holds one layer's float32
    // slices at most, so a 66B model loads on a machine with less memory than its weights.
    const ModelWeights w = source({0, 0, true});
    DeviceBuffer<float> staging;
    embed_ = upload<T>({&w.embed}, staging);
    if (!w.lm_head.empty()) lm_head_ = upload<T>({&w.lm_head}, staging);
    positions_ = uploadFloat(w.positions);
    if (!w.project_in.empty()) project_in_ = upload<T>({&w.project_in}, staging);
    if (!w.project_out.empty()) project_out_ = upload<T>({&w.project_out}, staging);
    final_norm_w_ = uploadFloat(w.final_norm_w);
    final_norm_b_ = uploadFloat(w.final_norm_b);
    const size_t Q = size_t(part_.q_heads) * c_.head_dim, KV = size_t(part_.kv_heads) * c_.head_dim,
                 F = size_t(part_.ffn());
    mirror_bases_.rank = host_forms_ ? kv_spec_.rank : 0;
    for (int l = 0; l < c_.layers; ++l) {
      const ModelWeights piece = source({l, l + 1, false});
      const LayerWeights& L = piece.layers[l];
      GpuLayer<T>& g = layers_.emplace_back();
      g.attn_norm_w = uploadFloat(L.attn_norm_w);
      g.attn_norm_b = uploadFloat(L.attn_norm_b);
      g.ffn_norm_w = uploadFloat(L.ffn_norm_w);
      g.ffn_norm_b = uploadFloat(L.ffn_norm_b);
      g.wqkv = upload<T>({&L.wq, &L.wk, &L.wv}, staging);
      g.bqkv = fusedBias({{&L.bq, Q}, {&L.bk, KV}, {&L.bv, KV}});
      g.wo = upload<T>({&L.wo}, staging);
      g.bo = part_.rank == 0 ? uploadFloat(L.bo) : DeviceBuffer<float>();  // added once
      if (c_.family == Family::Llama) {
        g.w_in = upload<T>({&L.w_gate, &L.w_up}, staging);
        g.b_in = fusedBias({{&L.b_gate, F}, {&L.b_up, F}});
      } else {
        g.w_in = upload<T>({&L.w_up}, staging);
        g.b_in = uploadFloat(L.b_up);
      }
      g.w_down = upload<T>({&L.w_down}, staging);
      g.b_down = part_.rank == 0 ? uploadFloat(L.b_down) : DeviceBuffer<float>();
      if (host_forms_ && kv_spec_.rank > 0)  // the mirror projects with the CPU's bases (Model::lowRankBases)
        kv::addLayerBases(mirror_bases_, L.wk.data(), L.wv.data(), part_.kv_heads, c_.head_dim, c_.hidden);
      if (lowrank_) {  // the CPU's bases (Model::lowRankBases), from the same float weights
        kv::LowRankBases b{.rank = kv_spec_.rank};
        kv::addLayerBases(b, L.wk.data(), L.wv.data(), part_.kv_heads, c_.head_dim, c_.hidden);
        std::vector<const std::vector<float>*> keys, values;
        for (int h = 0; h < part_.kv_heads; ++h) keys.push_back(&b.keys[h]), values.push_back(&b.values[h]);
        g.key_basis = upload<T>(keys, staging);
        g.value_basis = upload<T>(values, staging);
      }
    }
    if (c_.family == Family::Llama) {
      mirror_bases_.rope_inv_freq = ropeInverseFrequencies(c_);
      inv_freq_ = DeviceBuffer<float>(mirror_bases_.rope_inv_freq);
    }
    seqs_.emplace_back(c_, part_, kv_spec_, host_group_, mirror_bases_, mirror_filters_);
  }

  void startWindow() override {
    if (observed_len_ > 0 && observed_seq_ == current_) observed_len_ = 0;
    Sequence& s = seq();
    std::fill(s.len.begin(), s.len.end(), 0);
    s.longest = 0, s.uniform = true, s.weights_pending = false, s.unscored = 0, s.on_device = false;
    s.compact = s.compact_counted = 0;
    if (prompt_seq_ == current_) dropPromptRing();
    for (auto* v : {&s.coded, &s.coded_kept, &s.runs_alive, &s.next_run}) std::fill(v->begin(), v->end(), 0);
    s.prompt_kept.assign(s.len.size(), 0);
    s.positions.clear();
    s.mirror.clear();
    for (auto& p : s.row_positions) p.clear();
    s.policy.startWindow();
  }
  bool compresses() const override { return kv_spec_.compresses(); }
  kv::KvBytes kvBytes(int tokens_seen) const override;  // runtime/gpu_store.cuh

  void useSequence(int s) override {
    if (s < 0 || s >= int(seqs_.size()))
      throw Error("sequence " + std::to_string(s) + " of a batch of " + std::to_string(seqs_.size()));
    current_ = s;
  }

  void reserve(int batch, int tokens) override {
    if (batch < 1 || batch > kMaxBatch || tokens < 0)
      throw Error("reserve: a batch of 1.." + std::to_string(kMaxBatch) + " sequences and tokens >= 0 (asked " +
                  std::to_string(batch) + ", " + std::to_string(tokens) + ")");
    if (batch == int(seqs_.size())) return growTo(tokens);
    // A new layout: every sequence starts empty, the cache sized exactly.
    checkRoom(batch, tokens);
    for (auto& L : layers_) L.dropCache();
    weights_ = {}, score_ = {}, history_ = {};
    capacity_ = 0, run_capacity_ = 0, code_capacity_ = 0;
    dropPromptRing();
    observed_len_ = 0;
    seqs_.clear();
    for (int s = 0; s < batch; ++s)
      seqs_.emplace_back(c_, part_, kv_spec_, host_group_, mirror_bases_, mirror_filters_);
    current_ = 0;
    growTo(tokens);
  }

  // The KV policy after a step (runtime/gpu_compress.cuh: on the host mirror, or on the device).
  void compress(int last_pos, bool prefill) override;
  void compressBatch(const std::vector<int>& last_positions) override;

  std::vector<double> step(const int* tokens, const int* positions, int rows, int from, int count,
                           const int* targets) override {
    advance(tokens, positions, rows);
    return head(from, count, targets);
  }
  std::vector<float> stepLogits(const int* tokens, const int* positions, int rows) override {
    advance(tokens, positions, rows);
    return headLogits(rows - 1, 1);
  }
  std::vector<double> decodeBatch(const int* tokens, const int* positions, const int* targets) override {
    advanceBatch(tokens, positions);
    return head(0, int(seqs_.size()), targets);
  }
  std::vector<float> decodeBatchLogits(const int* tokens, const int* positions) override {
    advanceBatch(tokens, positions);
    return headLogits(0, int(seqs_.size()));
  }

  double collectiveSeconds() const override { return collectives_.seconds(); }
  std::vector<std::pair<std::string, double>> decisionPhaseSeconds() const override { return phases_; }
  std::vector<int> headRows() const override { return seqs_[current_].len; }
  void synchronize() override { KVTP_CUDA_CHECK(cudaDeviceSynchronize()); }

 private:
  // runtime/gpu_step.cuh: `rows` new tokens of the current sequence, or one token of each of the
  // batch's sequences, through the model and into its cache.
  void advance(const int* tokens, const int* positions, int rows);
  void advanceBatch(const int* tokens, const int* positions);

  static constexpr int kMaxBatch = 256;
  static constexpr int kMaxFewRows = 8;  // a step of more rows goes through the prefill attention
  // What a step runs: `rows` new tokens of the current sequence, or (batch) one token of each
  // sequence; `many` rows go through the prefill attention, `observe` leaves its probabilities.
  struct Shape {
    int rows;
    bool many, observe, batch;
  };

  Sequence& seq() { return seqs_[current_]; }
  // The current sequence's rows of the last step, [first, first + count) of its rows: a batch's
  // step has one row per sequence, in sequence order; any other step is this sequence's alone.
  struct StepRows {
    int first, count;
  };
  StepRows lastStepRows() const { return last_step_.batch ? StepRows{current_, 1} : StepRows{0, last_step_.rows}; }

  void admit(Sequence& s, const int* positions, int rows);  // gpu_step.cuh: before its step
  void cached(Sequence& s, int rows);                       // gpu_step.cuh: after it
  // Rows held in the compact form after `rows` more: KIVI's codes (kv::Policy::quantize: the runs
  // of `group` rows that left the residual window), low rank's coordinates (kv::Policy::project:
  // every row older than the window).
  int compactAfter(const Sequence& s, int rows) const {
    if (lowrank_) return std::max(s.compact, s.longest + rows - kv_spec_.lowrank_window);
    const int pending = s.longest + rows - kv_spec_.residual - s.compact;
    return s.compact + std::max(0, pending) / kv_spec_.group * kv_spec_.group;
  }
  // A KIVI cache's geometry (its code bytes, value groups, key groups of `capacity` coded rows), no buffers.
  cuda::KiviCache<T> kiviShape(int64_t capacity = 0) const {
    return {.head_dim = c_.head_dim, .bits = kv_spec_.bits, .group = kv_spec_.group, .capacity = capacity,
            .key_groups = kivi_evicts_ ? run_capacity_ : capacity / kv_spec_.group + 1};
  }
  // Layer l's KIVI cache from KV head head0 (of the batch's heads) on; counts not set.
  cuda::KiviCache<T> kiviAt(int l, size_t head0);

  void run(const int* tokens, const int* positions, const Shape& shape);  // gpu_step.cuh: the step's device work

  // Eviction decided on the device (runtime/gpu_compress.cuh): SCOPE's decode phase, the per-step
  // methods' select with histograms summed over NCCL, replicated heads' probabilities summed first.
  void decideDecodedOnDevice(Sequence& s, int last_pos);
  // A step after which nothing is decided: its rows count as kept.
  void keepUndecided(Sequence& s);
  // Sequences [first, first + count) of the batch decided together, their heads side by side —
  // (layer, sequence, KV head), as the device lays them out.
  struct Span {
    int first, count;
  };
  Span here() const { return {current_, 1}; }
  // Head i of a span: its sequence, and its index among that sequence's (layer, KV head)s.
  std::pair<Sequence&, int> spanHead(Span span, int i) {
    const int H = part_.kv_heads, BH = span.count * H;
    return {seqs_[size_t(span.first + i % BH / H)], i / BH * H + i % H};
  }
  // A per-(layer, KV head) count of the span's sequences, in the span's order of heads.
  std::vector<int> spanCounts(Span span, std::vector<int> Sequence::*counts) const {
    const size_t H = part_.kv_heads;
    std::vector<int> out;
    for (int l = 0; l < c_.layers; ++l)
      for (int b = 0; b < span.count; ++b) {
        const std::vector<int>& c = seqs_[size_t(span.first + b)].*counts;
        out.insert(out.end(), c.begin() + l * H, c.begin() + (l + 1) * H);
      }
    return out;
  }
  // The span's step, each sequence ending at last_positions[its index in the span]. `decides`
  // false (interval=): the step's attention is scored, nothing evicted.
  void decideOnDevice(Span span, const std::vector<int>& last_positions,
                      const kv::Policy::DecodedBudget* decoded = nullptr, bool decides = true);
  // Whether the batch's decode step can be decided at once (compressBatch).
  bool decidesBatchTogether() const;
  const float* sumReplicated(const float* w, int64_t& layer_stride, int64_t& head_stride, int n);
  // The decision of a step, on the mirror or the device (compress() then settles KIVI's runs).
  void decide(Sequence& s, int last_pos, bool prefill);
  // The span's rows as the device decision and compaction see them (cuda::EvictionCache):
  // per-layer pointers at its first head; d_offsets_lengths: per (layer, KV head) table offsets,
  // then slots.
  cuda::EvictionCache deviceRows(const int* d_offsets_lengths, Span span);

  // KIVI and low rank under eviction (runtime/gpu_windowed.cuh): the compaction by keep flags, the
  // runs quantized or the rows projected after the decision, the ring's room for a step, the key
  // pairs' room.
  void compactCoded(Span span, const cuda::EvictionCache& rows, const uint8_t* keep, bool compact_all);
  void compactCodedAsMirror(Sequence& s);
  void compactAsMirror(Sequence& s);  // gpu_compress.cuh: the caches other than KIVI and low rank
  void pruneKeyChannels(Sequence& s);  // gpu_compress.cuh: ThinK at the prompt's end
  void copyRowsToMirror(Sequence& s);  // gpu_compress.cuh: mirrorReadsRows
  // hostHoldsForms (gpu_compress.cuh): the step's rows into the mirrors; the entries a decision
  // converted written back decoded (forms: each head's (position, form) before it).
  void appendStepRows(const int* positions, int rows, bool batch);
  void writeConverted(Sequence& s, const std::vector<std::vector<std::pair<int32_t, kv::Form>>>& forms);
  void lowRankRowsToHost(const Sequence& s, const std::vector<int>& meta, float* keys, float* values);
  std::vector<std::vector<float>> stepQueries(const Sequence& s);  // gpu_compress.cuh: scoresByQueries
  void settleKivi(Sequence& s);
  void settleLowRank(Sequence& s);
  cuda::LowRankCache<T> lowRankAt(int l, size_t head0, const int* projected, const int* projected_after);
  void ringRoom(int rows);
  void leavePromptRing(Sequence& s);
  const int* uploadRingRows(const Sequence& s);
  int fullRowsHeld(const Sequence& s) const;
  void dropPromptRing() { prompt_ring_k_ = {}, prompt_ring_v_ = {}, prompt_seq_ = -1, prompt_rows_ = 0; }
  // Head i's slots whose entries the mirror kept (its positions matched in order); the head's
  // positions then follow the mirror's.
  std::vector<int> keptSlots(Sequence& s, int i) {
    auto& was = s.row_positions[i];
    const auto& now = s.mirror.head(i / part_.kv_heads, i % part_.kv_heads).positions;
    std::vector<int> slots;
    size_t j = 0;
    for (const int32_t p : now) {
      while (was[j] != p) ++j;
      slots.push_back(int(j++));
    }
    was = now;
    return slots;
  }
  void growRuns(int64_t runs);
  void growCoded(int64_t rows);  // gpu_store.cuh
  // Layer l's ring from KV head head0 on: the shared one, or the pending prompt's.
  cuda::Ring<T> ringAt(int l, size_t head0);

  // log p(targets) from hidden rows from .. from + count - 1 of the step just run.
  std::vector<double> head(int from, int count, const int* targets);
  // The logits of hidden rows from .. from + count - 1 over the whole vocabulary, (count, vocab):
  // each rank's slice gathered over the group.
  std::vector<float> headLogits(int from, int count);
  // Hidden rows from .. from + count - 1 of the step just run, final-normed (and projected) into
  // the head's input (type T).
  const T* finalRows(int from, int count);

  void allReduce(float* data, size_t n) {
    if (part_.tp > 1) timed([&] { group_->allReduceSum(data, n); });
  }
  // A collective between two marks of the collective timer.
  template <class F>
  void timed(F&& collective) {
    if (time_collectives_) collectives_.mark();
    collective();
    if (time_collectives_) collectives_.mark();
  }

  // Cache bytes per (KV head, token): K and V rows (int8: codes and a step each; KIVI: its coded row,
  // but under eviction none: growCoded; low rank: coordinates) and a position.
  size_t rowBytes() const;
  // KIVI's coded row: codes, the value's (lo, step) pairs, a share of its run's key pairs (under
  // eviction its run's index too).
  size_t codedRowBytes() const;
  // Bytes per KV head that do not grow with the tokens: KIVI's and low rank's ring.
  size_t headBytes() const { return windowed_ ? 2 * size_t(ring_) * c_.head_dim * sizeof(T) : 0; }
  // Bytes of a cache of `batch` x `tokens` rows per KV head: every layer's, and low rank's stage
  // (one layer's rows at full precision); KIVI under eviction: with `coded_rows` coded rows a head.
  size_t cacheBytes(size_t batch, int64_t tokens, int64_t coded_rows = 0) const;
  // Throws Error unless the device can hold a cache of `batch` x `tokens` rows per KV head (the
  // present cache is freed as the new one is made).
  void checkRoom(int batch, int64_t tokens);

  // Room for a step that needs `need` cached tokens per KV head: geometric growth, so a long
  // window regrows the cache O(log n) times.
  void makeRoom(int need) {
    if (need > capacity_) growTo(std::max<int64_t>({need, 2 * int64_t(capacity_), 256}));
  }
  // Grows the cache to `cap` tokens per KV head unless it holds that many, keeping what is cached.
  void growTo(int64_t cap);

  // Embedding and every layer for the step's rows into x_ (d_meta: their positions, then per
  // (layer, sequence, KV head) the first free slot, then the count after): kernel launches only,
  // no host synchronisation.
  void forward(const int* d_tokens, const int* d_meta, const Shape& shape);  // runtime/gpu_forward.cuh

  // The norms a layer's halves take part in (cuda::DeferredNorm): the first product reads `in`'s
  // fed row (null: its input is normalized already), the residual's product emits `out`'s.
  struct Norms {
    const cuda::DeferredNorm<T> *in = nullptr, *out = nullptr;
  };
  // Whether this step's RMSNorms can be deferred: Llama on one GPU (the all-reduce of tp > 1 adds
  // the residual outside the products), one row through the GEMV kernels for all four products.
  bool deferNorms(int rows) const {
    return c_.family == Family::Llama && part_.tp == 1 &&
           cuda::deferredNormFits<T>(rows, c_.hidden, part_.q_heads * c_.head_dim, part_.ffn(), c_.head_dim);
  }

  // x += o_proj(attention(qkv_proj(xn))), the new rows' K/V cached first.
  void attention(int layer, const T* xn, const int* d_pos, const int* slots, const int* lengths, const int* compact,
                 const Shape& shape, float* x, const Norms& norms);  // runtime/gpu_attention.cuh

  void mlp(int layer, const T* xn, int T_, float* x, const Norms& norms);  // runtime/gpu_forward.cuh

  // x += all-reduce(in · W^T) (+ bias, on rank 0 only); `emit`: a deferred norm of the new x (tp 1).
  void rowParallel(const T* in, int T_, int in_dim, const T* W, const float* bias, float* x,
                   const cuda::DeferredNorm<T>* emit);  // runtime/gpu_forward.cuh

  // log p(targets) from `rows` hidden rows (type T): vocab-parallel partials, gathered across
  // ranks and combined in rank order as on the CPU.
  std::vector<double> logprobs(const T* hidden, int rows, const int* targets);

  ModelConfig c_;
  Partition part_;
  comm::Communicator* group_;
  const kv::PolicySpec kv_spec_;
  comm::Communicator* host_group_;
  cuda::Blas blas_;
  DeviceBuffer<T> embed_, lm_head_, project_in_, project_out_;
  DeviceBuffer<float> positions_, final_norm_w_, final_norm_b_, inv_freq_;
  DeviceBuffer<float> norm_sums_;  // a deferred norm's partial sums (cuda::DeferredNorm)
  DeviceBuffer<float2> rope_;  // this step's RoPE rotations (cuda::ropeTable)
  std::vector<GpuLayer<T>> layers_;
  // The batch's sequences (std::deque: a Sequence does not move), the one step() acts on, and the
  // cache's room per KV head.
  std::deque<Sequence> seqs_;
  int current_ = 0, capacity_ = 0;
  kv::StepAttention attention_;
  // A prompt's observed probabilities [layer][kv_head][observed_rows_][observed_len_], pending
  // for sequence observed_seq_'s compress() while observed_len_ > 0.
  DeviceBuffer<float> observed_;
  int observed_rows_ = 1, observe_from_ = 0;  // the observation: rows kept apart (1: summed), first row
  int observed_len_ = 0, observed_seq_ = 0;
  // A decode step's probabilities [layer][sequence][kv_head][capacity], for policies that evict as
  // they decode.
  DeviceBuffer<float> weights_;
  // Eviction decided on the device (decideOnDevice): which policies (the per-step methods, and
  // SnapKV's and PyramidKV's prompt), their per-entry state [layer][sequence][kv_head][capacity]
  // (H2O's scores, Scissorhands' bits), and scratch.
  const bool device_decides_;
  const bool device_decides_decoded_;  // SCOPE's decode phase
  DeviceBuffer<double> score_, table_;
  DeviceBuffer<uint64_t> history_;
  DeviceBuffer<float> query_filters_;  // Q-Filters: [layer][kv_head][head_dim]
  std::vector<std::vector<float>> mirror_filters_;  // the same for the mirrors' policies (low rank decides there)
  DeviceBuffer<int> evict_meta_;
  DeviceBuffer<int64_t> evict_budget_;
  DeviceBuffer<float> replicated_weights_;  // sumReplicated's
  DeviceBuffer<void*> evict_ptrs_;
  DeviceBuffer<int> evict_coded_;  // KIVI: coded slots per (layer, KV head) for deviceRows
  DeviceBuffer<int> entry_slots_;  // LagKV's, CUR's and ChunkKV's scratch (cuda::ScoreInputs)
  DeviceBuffer<double> row_sums_;
  DeviceBuffer<uint8_t> keep_flags_;
  // CriticalKV: the last step's rows' output norms [layer][row][kv_head] (a batch: a row a sequence).
  DeviceBuffer<float> output_norms_;
  DeviceBuffer<float> think_power_;  // ThinK: the prompt's query power [layer][kv_head][channel]
  // scoresByQueries: the last step's queries after RoPE [layer][row][q_heads x head_dim] (a
  // batch: a row a sequence); mirrorReadsRows: the rows copied down, keys then values.
  DeviceBuffer<float> step_queries_, mirror_rows_;
  // The last step's shape, which lays out output_norms_ and step_queries_: set by run() on the
  // host every step, never inside the launches, which a replayed CUDA graph does not run (a
  // stale count from a window's prompt once read a decode step's norms as 384 rows and wrote
  // past a head's entries: the host heap corrupted, a crash in cudaGraphLaunch).
  Shape last_step_{0, false, false, false};
  // An int8, KIVI or low-rank cache (GpuLayer::K8..., Kq..., coords; KIVI's and low rank's ring
  // of full-precision rows per KV head: `windowed_` — with int8, low rank's ring holds codes:
  // LowRankCache::int8), and the stage a step reads it through in T (int8, KIVI: many-row steps;
  // low rank: every step).
  // KIVI and low rank under eviction (runtime/gpu_windowed.cuh) quantize or project after the
  // decision, not in the step, so a prompt waits for its decision at full precision in a ring of
  // its own (sequence prompt_seq_'s heads of every layer, prompt_rows_ rows each), then its kept
  // rows move to the shared ring.
  const bool host_forms_;  // hostHoldsForms: the device holds full-precision rows, the mirror every form
  kv::LowRankBases mirror_bases_;  // host_forms_ with low rank: the mirrors' bases
  DeviceBuffer<float> new_rows_;   // host_forms_: the step's rows read out, then the converted written back
  DeviceBuffer<int64_t> converted_at_;
  const bool int8_, kivi_, lowrank_, windowed_, windowed_evicts_, kivi_evicts_;
  const int ring_;
  DeviceBuffer<T> prompt_ring_k_, prompt_ring_v_;  // [layer][kv_head][prompt_rows_][head_dim]
  int prompt_rows_ = 0, prompt_seq_ = -1;
  int64_t run_capacity_ = 0;  // KIVI under eviction: key pairs per KV head
  int64_t code_capacity_ = 0;  // KIVI: coded rows per KV head (capacity_ but under eviction: growCoded)
  DeviceBuffer<int> run_map_, kivi_meta_;
  DeviceBuffer<void*> kivi_ptrs_;
  // What evict_ptrs_ and kivi_ptrs_ hold (uploadPointers).
  std::vector<void*> evict_ptrs_held_, kivi_ptrs_held_;
  // `ptrs` in `buffer` on the device, uploaded only when they differ from what it holds (`held`):
  // they change only when the cache's buffers do, and each upload waits for the device.
  void** uploadPointers(DeviceBuffer<void*>& buffer, std::vector<void*>& held, const std::vector<void*>& ptrs) {
    if (ptrs != held || buffer.size() < ptrs.size()) {
      KVTP_CUDA_CHECK(cudaMemcpy(grow(buffer, ptrs.size()), ptrs.data(), ptrs.size() * sizeof(void*),
                                 cudaMemcpyHostToDevice));
      held = ptrs;
    }
    return buffer.get();
  }
  DeviceBuffer<cuda::KiviCache<T>> kivi_layers_;  // settleKivi's, a layer each
  DeviceBuffer<uint8_t> ring_scratch_;
  DeviceBuffer<T> stage_k_, stage_v_;
  DeviceBuffer<int> stage_pos_;
  const bool time_collectives_, time_phases_;
  // compress()'s phases (time_phases_): seconds each, and when the current one began.
  std::vector<std::pair<std::string, double>> phases_;
  std::chrono::steady_clock::time_point phase_began_;
  // The phase that just ended (`name`; null: none, the first begins) gets the time since the
  // last one ended, the device's work included.
  void phaseEnds(const char* name) {
    if (!time_phases_) return;
    KVTP_CUDA_CHECK(cudaDeviceSynchronize());
    const auto now = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(now - phase_began_).count();
    phase_began_ = now;
    if (!name) return;
    auto it = std::find_if(phases_.begin(), phases_.end(), [&](const auto& p) { return p.first == name; });
    if (it == phases_.end()) phases_.emplace_back(name, seconds);
    else it->second += seconds;
  }
  cuda::StreamTimer collectives_;  // GPU time inside NCCL collectives (tp > 1); outlives the graphs
  cuda::GraphReplay decode_graph_, batch_graph_;  // one sequence's token; every sequence's
  size_t graph_marks_[2] = {0, 0};  // collective-timer marks of each captured step
  // Grow-only activations: after the first step of the longest shape, nothing is allocated.
  DeviceBuffer<int> tokens_, targets_, meta_, keep_;
  DeviceBuffer<float> x_, e_, qkv_, h_, partial_, logits_;
  DeviceBuffer<T> xn_, ctx_, act_;
  DeviceBuffer<kernels::SoftmaxPartial> partials_;
};

#include "runtime/gpu_store.cuh"
#include "runtime/gpu_step.cuh"
#include "runtime/gpu_forward.cuh"
#include "runtime/gpu_head.cuh"
#include "runtime/gpu_compress.cuh"
#include "runtime/gpu_windowed.cuh"
#include "runtime/gpu_attention.cuh"

}  // namespace

int64_t deviceBytesPeak() { return cuda::DeviceMemory::peak.load(); }
int64_t deviceBytesHeld() { return cuda::DeviceMemory::current.load(); }
int cudaDevices() { return cuda::deviceCount(); }

double peakMemoryBandwidth(int device) {
  int khz = 0, bits = 0;
  KVTP_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
  KVTP_CUDA_CHECK(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device));
  return 2.0 * khz * 1e3 * bits / 8;
}

int localDevice() {
  const int n = cuda::deviceCount();
  if (n == 0) throw Error("--device cuda: no CUDA device is visible to this process");
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  return local ? std::atoi(local) % n : 0;
}

std::unique_ptr<Engine> makeGpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source,
                                      const GpuOptions& o) {
  switch (o.dtype) {
    case Precision::F32: return std::make_unique<GpuEngine<float>>(config, part, source, o);
    case Precision::F16: return std::make_unique<GpuEngine<__half>>(config, part, source, o);
    case Precision::BF16: return std::make_unique<GpuEngine<__nv_bfloat16>>(config, part, source, o);
  }
  throw Error("unknown dtype");
}

std::unique_ptr<comm::Communicator> makeDeviceGroup(comm::Communicator& host_group, int device) {
  return comm::makeNccl(host_group, device);
}

}  // namespace kvtp
