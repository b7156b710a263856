// KV-cache compression (docs/KV.md): which tokens each head keeps, and how they are stored.
//
// A Policy sees every forward step's attention (per layer and local KV head, summed over the
// query heads that read it), keeps a score per cached entry, and after each step settles ONE
// budget shared by all heads of all layers of all ranks: a radix select whose histograms are
// all-reduced over the tensor-parallel group (kv/budget_select.h) gives every rank the same
// deterministic decision (ties broken by layer, head, position), so kept tokens and perplexity
// do not depend on tp. A few sink tokens and a recent window are always kept unless the spec turns them off.
#pragma once
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kv/budget_select.h"
#include "kv/kv_cache.h"
#include "kv/scorers.h"

namespace kvtp::kv {

// How a method scores entries: by the attention they receive (H2O, Scissorhands, SnapKV,
// PyramidKV, TOVA: Policy::score folds each step in), by position (StreamingLLM), by a fixed draw
// (Random), or by the cached keys and values at decision time (K-norm, KeyDiff, LagKV, leverage,
// CUR, Q-Filters: kv/scorers.h).
// SimLayerKV decides per layer instead: at the prompt's end a layer whose newest query looks at
// the sinks and the recent window only is "lazy" and streams from then on; the others keep all.
enum class Method { Full, StreamingLLM, H2O, Scissorhands, SnapKV, PyramidKV, Random, TOVA, KNorm, KeyDiff, LagKV,
                    SimLayerKV, Leverage, CUR, Expected, NonCausal, Compactor, Finch, QFilters };
enum class Scope { Global, Layer, Head };  // who competes for the budget
enum class Quant { None, Int8, Kivi };
enum class Decode { None, Slide, Adaptive, Discontinuous };  // SCOPE's decode-phase strategies

// `--kv NAME:key=value,...` and `--kv-quant NAME:key=value,...` (grammar in docs/KV.md).
struct PolicySpec {
  Method method = Method::Full;
  double budget = 1.0;      // fraction of the full cache (tokens seen x layers x KV heads)
  int budget_tokens = 0;    // or: tokens per head on average (overrides budget when > 0)
  int64_t budget_bytes = 0; // or: bytes for the whole model's cache, all ranks (overrides both)
  int sinks = 4;            // first tokens always kept
  int recent = 16;          // most recent tokens always kept
  Scope scope = Scope::Global;
  int history = 32;         // Scissorhands: steps of attention history per token
  int window = 32;          // SnapKV / PyramidKV / Finch: observation window (last prefill queries)
  int kernel = 7;           // SnapKV / PyramidKV: max-pool width over positions
  double pyramid_ratio = 4; // PyramidKV: first layer's budget / last layer's
  Decode decode = Decode::None;  // SnapKV / PyramidKV: how decoded tokens are compressed (SCOPE)
  int decode_budget = 64;   // SCOPE slide: decoded tokens kept per head
  int decode_recent = 16;   // SCOPE: most recent decoded tokens always kept
  int delta = 15;           // SCOPE adaptive/discontinuous: steps per budget increment / per compression
  uint64_t seed = 0;        // Random: the draw (the same at every tp)
  int lag = 128;            // LagKV: entries per partition
  int local = 16;           // CUR: entries per local normalization window (0: the whole head)
  int future = 512;         // expected attention: future positions RoPE's rotation is averaged over
  int span = 256;           // non-causal attention (noncausal, compactor): entries per chunk its queries attend
  double blend = -1;        // compactor: the leverage z-score's weight (< 0: 1 - budget, kvpress's default)
  double think = 0;         // ThinK: fraction of key channels pruned from the prompt's keys at its end (0: off)
  int interval = 1;         // per-step methods: decode steps between decisions (kvpress's DecodingPress)
  int chunk = 1;            // ChunkKV: entries share the mean score of their chunk of this many (1: off)
  double threshold = 0.9;   // SimLayerKV: a layer is lazy past this share of attention on sinks + recent
  double evict_below = -INFINITY;  // DMS-style: entries scoring below this go whatever the budget (-inf: off)
  double critical = 0;      // CriticalKV: share of a head's budget chosen by the score alone (0: off)
  int block = 0;            // the prompt compressed in blocks of this many entries (0: at once)
  std::string filters;      // Q-Filters: the calibrated filters' file (empty: qfilters.json in the model's folder)
  // Tiered precision: the forms an entry steps down through as it loses importance (first Full),
  // evicted after the last; empty: keep or evict. The budget is then in bytes (docs/KV.md).
  std::vector<Form> ladder;
  Quant quant = Quant::None;
  int bits = 8;             // KIVI: 2 or 4
  int group = 32;           // KIVI: tokens per key group (per channel), channels per value group
  int residual = 128;       // KIVI: most recent tokens kept in full precision
  int rank = 0;             // low-rank channels (CSKV): 0 = off, else coordinates per key/value
  int lowrank_window = 64;  // low-rank: most recent tokens kept at full rank (the second branch)

  bool evicts() const { return method != Method::Full; }
  // Whether the cache can differ from the full one (eviction, quantization, low rank or key channels pruned).
  bool compresses() const { return evicts() || quant != Quant::None || rank > 0 || think > 0; }
  bool needsAttention() const;
  // Whether the method scores entries by the queries too (expected attention: their statistics;
  // the non-causal attention of noncausal and compactor: the prompt's), as well as the cached rows.
  bool scoresByQueries() const {
    return method == Method::Expected || method == Method::NonCausal || method == Method::Compactor;
  }
  // Whether the policy reads the step's queries (those methods, and ThinK's channel power).
  bool needsQueries() const { return scoresByQueries() || think > 0; }
  // Whether the method compresses the prompt once, at its end (then SCOPE's decode= if set).
  bool promptOnce() const {
    return method == Method::SnapKV || method == Method::PyramidKV || method == Method::NonCausal ||
           method == Method::Compactor || method == Method::Finch;
  }
  // Whether entries need their ||W_o v||_1 (CriticalKV).
  bool needsOutputNorms() const { return critical > 0; }
  // Whether the method reads the cached keys and values when it decides (kv/scorers.h).
  bool readsRows() const {
    return method == Method::KNorm || method == Method::KeyDiff || method == Method::LagKV || method == Method::Leverage ||
           method == Method::CUR || method == Method::QFilters;
  }
  // Whether a decode step's attention changes the scores (SnapKV / PyramidKV without SCOPE's
  // decode phase score the prompt only).
  bool scoresDecoding() const;
  std::string describe() const;
};

PolicySpec parsePolicy(const std::string& kv, const std::string& kv_quant, const std::string& kv_lowrank = "");

// Where this rank's KV heads sit among the model's: global index = kv_head_begin + local index.
// With fewer KV heads than ranks a head is replicated; `owner` marks the one copy counted.
struct HeadLayout {
  int layers = 0;
  int global_kv_heads = 0;
  int kv_head_begin = 0;
  int local_kv_heads = 0;
  int head_dim = 0;
  bool replicated = false;
  bool owner = true;
};

// What one forward step shows the policy (kv::PolicySpec::needsAttention, needsQueries): for each
// (layer, local KV head), a (T, L) row-major block of probabilities summed over the local query
// heads of that KV head; and/or the step's pre-RoPE queries of those query heads, each a (T,
// head_dim) block, one after another in head order.
struct StepAttention {
  int T = 0;
  bool want_probabilities = true, want_queries = false, want_output_norms = false;
  std::vector<std::vector<float>> blocks;   // index layer * local_kv_heads + head
  std::vector<std::vector<float>> queries;  // index layer * local_kv_heads + head
  // CriticalKV: per (layer, local KV head), each new token's ||W_o v||_1 summed over the local
  // query heads reading it (T values)
  std::vector<std::vector<float>> output_norms;
};

// Bytes as a GPU runtime stores the cache: 2-byte values (fp16/bf16), packed codes with 2-byte
// scales/zero points when quantized, and a 4-byte position per entry once tokens are evicted.
struct KvBytes {
  int64_t stored = 0;  // this rank
  int64_t full = 0;    // the uncompressed cache of the same tokens, this rank
};

// An uncompressed cache of `tokens` entries per head: keys and values at 2 bytes, no index.
inline int64_t fullCacheBytes(int64_t tokens, int layers, int kv_heads, int head_dim) {
  return tokens * layers * kv_heads * 2 * int64_t(head_dim) * 2;
}

class Policy {
 public:
  Policy(PolicySpec spec, HeadLayout layout, comm::Communicator* group);

  const PolicySpec& spec() const { return spec_; }
  // Q-Filters: each (layer, local KV head)'s filter, head_dim values (index layer * local_kv_heads + head).
  void setQueryFilters(std::vector<std::vector<float>> filters);
  // After a forward step that appended tokens up to absolute position `last_pos` (prefill: T > 1).
  // Updates scores, evicts to the budget, quantizes what aged out of the residual window.
  void afterStep(KVCache& cache, const StepAttention& attn, int last_pos, bool prefill);
  // A new window (sequence) starts: its prefill and decode steps count from here.
  void startWindow() {
    prefill_end_ = 0, decode_steps_ = 0, lazy_.clear(), queries_.clear(), ladder_reserve_.clear();
  }
  KvBytes bytes(const KVCache& cache, int tokens_seen) const;
  // The budget's competition pools (one, one per layer, or one per (layer, KV head): each a
  // contiguous run of the global table) and each one's budget in entries after a step up to
  // `last_pos` — what eviction keeps to, for a decision taken elsewhere (the CUDA engine's).
  int poolCount() const;
  // Each (layer, global KV head)'s pool, in table order.
  std::vector<int> poolOfTableHeads() const;
  std::vector<int64_t> budgets(int last_pos) const;
  // A step ran (afterStep counts it; a decision taken elsewhere counts it here instead).
  void countStep(int last_pos, bool prefill);
  // Whether a per-step method decides after the step counted last: the prompt, and every
  // `interval`-th decode step (between them the cache grows).
  bool decidesAfter(bool prefill) const { return prefill || decode_steps_ % spec_.interval == 0; }
  // SCOPE's decode phase after the step counted last: whether it compresses the decoded entries,
  // how many of them each head keeps, and the first decoded position (the prompt's end).
  struct DecodedBudget {
    bool decides;
    int per_head;
    int prefill_end;
  };
  DecodedBudget decodedBudget() const;
  // What the last eviction's decision sent through the group's collectives.
  SelectTraffic lastDecisionTraffic() const { return last_traffic_; }
  // `width` values per (layer, local KV head), one after another, summed in place over the ranks
  // holding a replicated KV head as sumOverReplicas does (the CUDA engine's ThinK query power).
  void sumOverReplicas(std::vector<float>& flat, int width) const;

 private:
  // Blocks per (layer, local KV head), summed over the ranks holding a replicated KV head (each
  // holds a share of its query heads); as they are otherwise.
  std::vector<std::vector<float>> sumOverReplicas(const std::vector<std::vector<float>>& blocks) const;
  void score(KVCache& cache, const StepAttention& attn, bool prefill);
  void evict(KVCache& cache, const StepAttention& attn, int last_pos, bool prefill);
  void evictDecoded(KVCache& cache, int last_pos);
  void quantize(KVCache& cache) const;
  void project(KVCache& cache) const;  // low-rank channels: the cache must hold the bases
  int globalIndex(int layer, int local_head) const;
  void findLazyLayers(const KVCache& cache, const StepAttention& attn);  // SimLayerKV, at the prompt's end
  void addQueries(const StepAttention& attn, int last_pos);             // expected attention's statistics
  // noncausal / compactor at the prompt's end, from its queries: each entry's score (empty for the
  // other methods).
  std::vector<std::vector<double>> nonCausalKeys(const KVCache& cache, const StepAttention& prompt);
  void pruneKeyChannels(KVCache& cache, const StepAttention& prompt);  // ThinK, at the prompt's end
  void addOutputNorms(KVCache& cache, const StepAttention& attn);       // CriticalKV's ||W_o v||, new entries
  // CriticalKV on one head's keys: its `first` best by the score alone kept first, the others by
  // (score + eps) x ||W_o v||_1 (entries already +inf, the protected, left as they are).
  static void criticalKeys(const HeadCache& c, int first, std::vector<double>& key);
  // The row-reading method's scores of n entries of a (layer, local KV head) (kv/scorers.h).
  void rowScores(int layer, int local_head, const HeadRows& rows, const int* positions, int n,
                 const std::vector<float>& rope_inv_freq, double* key) const;
  void evictInBlocks(const KVCache& cache, int last_pos, const std::vector<int64_t>& pool_budget,
                     const std::vector<int>& pool_of, bool shared);
  void retainKept(KVCache& cache);
  // A head's even share of its pool's budget (CriticalKV's first stage, block-wise compression's start).
  int64_t headShare(const std::vector<int64_t>& pool_budget, const std::vector<int>& pool_of, int layer,
                    int local_head) const;
  void streamLazyLayers(KVCache& cache, int last_pos);
  // Tiered precision: each entry's rung from its key (SelectHead), every pool filled as
  // docs/KV.md says, by one select per rung; applies the forms and the evictions.
  void settleLadder(KVCache& cache, const std::vector<SelectHead>& heads, const std::vector<int>& pool_of,
                    int last_pos, bool shared);

  PolicySpec spec_;
  HeadLayout lay_;
  comm::Communicator* group_;
  int prefill_end_ = 0;   // first position decoded (not part of the prompt)
  int decode_steps_ = 0;  // decode steps since the prompt
  // evict()'s keys and decisions per (layer, local KV head), kept between steps: a decode step
  // allocating them afresh spent most of its time faulting pages in (7B shape, 8k: 1.7M entries).
  std::vector<std::vector<double>> keys_;
  std::vector<std::vector<uint8_t>> keep_;
  std::vector<uint8_t> lazy_;  // SimLayerKV: per layer, decided at the prompt's end
  std::vector<std::vector<float>> query_filters_;  // Q-Filters: per (layer, local KV head)
  // A ladder with KIVI's rung: per pool, the bytes the last decision left beyond the costs it
  // counted (entries waiting for a run, thinned runs' key pairs), the next decision's first reserve.
  std::vector<double> ladder_reserve_;
  std::vector<std::vector<QueryStats>> queries_;  // expected attention: per (layer, local KV head), its query heads
  SelectTraffic last_traffic_;
};

}  // namespace kvtp::kv
