// Eviction decided on the device: kv::Policy's decision for the methods that evict after every
// decode step (H2O, Scissorhands, StreamingLLM) — one key per entry of this rank's heads, the
// same budgets, the same select as the CPU's (kv/budget_select.h: histograms summed over the
// ranks, never a table of every entry), so the kept tokens are the CPU's at any tp
// (tests/cuda_engine_test.cpp). The host's decision walked every entry on the CPU each step (a
// 7B model at 8k holds 1.7 M); here it is a few kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

#include "kernels/radix_select.h"

namespace kvtp::cuda {

// StepAttention: this step's probability alone (SCOPE's decode phase); KeyNorm: -||k|| of the
// cached key (K-norm, kv::keyNormScores); KeyDiff: -cos(k, the mean normalized key) (kv::keyDiffScores);
// QueryFilter: k . the head's filter (Q-Filters, kv::queryFilterScores); Random: the entry's fixed
// draw (kernels::entryDraw); Lag: LagKV's rank in its partition (kv::lagScores); CUR: the
// product of key and value squared-norm shares (kv::curScores); SnapKV: the prompt's observation
// window's probability (the weights), max-pooled over ScoreInputs::pool entries (kv::maxPool, after
// ChunkKV's means) — SnapKV's and PyramidKV's prompt, over a head without holes.
enum class EvictScore {
  H2O, Scissorhands, StreamingLLM, StepAttention, KeyNorm, KeyDiff, QueryFilter, Random, Lag, CUR, SnapKV
};

// What some scores read besides the cache: Random's seed and, per (layer, head) of this rank, its
// table head (layer x global_heads + its global KV head); Q-Filters' filters, per (layer, head)
// of this rank head_dim values (device); LagKV's partition length, CUR's window, and their
// scratch, four doubles per slot of the table; ChunkKV's chunk (1: none). LagKV, CUR and chunks
// read a head's entries in order past its holes: entry_slots, an int per slot of the table (device).
// SnapKV's max-pool width (its kernel=).
// A batch's sequences decided together end at their own positions: last_positions, per (layer,
// head) (device; null: every head's is evictionKeys' last_pos).
struct ScoreInputs {
  uint64_t seed = 0;
  const int* table_heads = nullptr;
  int global_heads = 1;
  const float* query_filters = nullptr;
  int lag = 0, local = 0;
  double* row_sums = nullptr;
  int chunk = 1;
  int* entry_slots = nullptr;
  const int* last_positions = nullptr;
  int pool = 1;
};

// How the cache's rows hold a key or value (the row-scored methods read them): fp32, fp16, bf16,
// int8 codes times the row's step, or KIVI's (EvictionCache::kivi).
enum class KeyFormat { F32, F16, BF16, Int8, Kivi };

// A KIVI cache's rows as the row-scored methods read them (kv::KVCache::rows): slots [0, coded)
// of a head are `bits`-bit codes (EvictionCache's K and V rows); a key channel x = lo + code x
// step with the (lo, step) of the row's run, a value channel with its row's pair for its group of
// `value_group` channels; slots [coded, length) are full-precision rows in the ring (slot i at
// ring row i % ring_rows), of ring_format — the pairs' format too (cuda::AffinePair). Per-layer
// arrays at the sequence's first head.
struct KiviRows {
  int head_dim = 0, bits = 0, value_group = 0, ring_rows = 0;
  KeyFormat ring_format = KeyFormat::F32;
  int64_t key_groups = 0;                    // runs' key pairs per head
  const void* const* k_params = nullptr;     // per layer: [head][key_groups][head_dim] x (lo, step)
  const void* const* v_params = nullptr;     // per layer: [head][code capacity][value groups] x (lo, step)
  const int* const* run = nullptr;           // per layer: [head][code capacity]
  const void* const* ring_k = nullptr;       // per layer: [head][ring_rows][head_dim]
  const void* const* ring_v = nullptr;
  const int* coded = nullptr;                // device, per (layer, head)
};

// The position of an evicted slot left in place (a hole: no query sees it, attention skips its
// row): compaction waits until a head's holes are an eighth of its slots, so a step moves no rows
// most of the time.
constexpr int kEvicted = 0x7fffffff;

// One sequence's KV heads of every layer, as the CUDA engine lays them out: head h of layer l at
// row h * capacity of that layer's arrays (its K and V rows at h * rowStride()) — the per-layer
// arrays given as device arrays of `layers` pointers, already at the sequence's first head — or of
// the engine-wide arrays at l * layer_stride + h * capacity (scores, Scissorhands' history bits).
struct EvictionCache {
  int layers, heads;
  int64_t capacity;
  int row_bytes;  // one key (or value) row: head_dim x the element size (int8: head_dim)
  KeyFormat key_format;
  void* const* K;
  void* const* V;
  int* const* pos;
  float* const* k_step;  // an int8 cache's steps; null otherwise
  float* const* v_step;
  double* score;         // H2O's accumulated attention (null for the others)
  uint64_t* history;     // Scissorhands' bits (null for the others)
  int64_t layer_stride;
  // The step's probabilities per entry, head h of layer l at l * weights_layer + h * weights_head
  // (a decode step's: laid out as the scores; a prompt's observation: its own); null: none.
  const float* weights;
  int64_t weights_layer, weights_head;
  const int* length;        // device, per (layer, head): slots in use (entries and holes)
  const int* table_offset;  // device, per (layer, head): its first entry in this rank's table
  KiviRows kivi = {};       // key_format Kivi: where the rows are
  // KIVI: the coded rows a head of K, V and the value pairs and runs (KiviRows, KiviEviction),
  // fewer than the slots under eviction; 0: capacity.
  int64_t code_capacity = 0;
  __host__ __device__ int64_t rowStride() const { return code_capacity ? code_capacity : capacity; }
};

// Folds the step's probabilities into each entry's score (the last `fresh` entries of a head,
// appended since the last decision, start from zero) and writes its key into `table`: +inf for
// the protected (position < sinks or > last_pos - recent), else (with ChunkKV's chunks, averaged
// over each chunk of entries) H2O's score, the position
// (StreamingLLM: the most recent win), the count of Scissorhands' set bits under history_mask or
// the step's probability, -||k||, KeyDiff's -cos, the key's projection on its filter or the random
// draw; -inf for a hole, which is never kept and takes no entry's place.
void evictionKeys(const EvictionCache& c, EvictScore method, int fresh, uint64_t history_mask, int sinks, int recent,
                  int last_pos, double* table, const ScoreInputs& inputs = {});

// Scissorhands' prompt (kv::Policy::score's, kv::appendHistoryBits): per (layer, head) of c, its
// last `fresh` entries start with no history, then each of the prompt's `rows` observed rows in
// order — row t of a head at its weights + t x row_stride, one probability per slot — appends a bit
// to every entry it saw. Into c.history; evictionKeys then keys the bits (no weights, nothing fresh).
void promptHistory(const EvictionCache& c, int fresh, int rows, int64_t row_stride);

// The budget's pools as this rank's decision sees them (kv/budget_select.h).
struct SelectLayout {
  const int* head_table;  // device, per (layer, head) of this rank: its (layer, global KV head) index
  const int* pool_of;     // device, per table head of every rank: its pool (nondecreasing)
  const int64_t* budget;  // device, per pool: entries kept
  int table_heads, pools;
  bool counted;           // this rank's entries count in the sums (a replicated head: one copy does)
};

// keep[table_offset + e] = whether entry e of a head is kept: kv::selectBudget's rule (each pool's
// r highest keys, ties to the lower table place, every +inf, no -inf) over the pools of every
// rank. sum_over_ranks all-reduces a device array of doubles over the ranks the pools span
// (eight histograms of pools x 256 counts, then a count per table head), empty at one rank.
void evictionDecide(const EvictionCache& c, const double* table, const SelectLayout& s,
                    const std::function<void(double*, size_t)>& sum_over_ranks, uint8_t* keep);

// CriticalKV's output norms (critical=; the CPU's in Model's attention): for each of `rows` new
// rows and each KV head h, sum over the query heads reading h (in order) of ||W_o,q v||_1, W_o,q
// the columns of query head q in W_o (hidden x q_dim, row-major, as the engine holds it) and v the
// row's value of head h in qkv (fp32, `stride` a row, values from v_offset). Into
// norms[row x kv_heads + h] (device). Products in float, their absolute values summed in double.
template <class T>
void valueOutputNorms(const float* qkv, int64_t stride, int64_t v_offset, int rows, int kv_heads, int group,
                      int head_dim, const T* wo, int hidden, int q_dim, float* norms);

// ThinK (think=; kv::Policy::pruneKeyChannels), its two halves. First, in the prompt's step: per KV
// head h and channel c, the sum over the query heads reading h (in order) and the last `window`
// of the `rows` query rows (post-RoPE, fp32 in qkv, `stride` a row) of q_c^2, in double, into
// power[h x head_dim + c] as float (the CPU keeps it so).
void queryChannelPower(const float* qkv, int64_t stride, int rows, int window, int kv_heads, int group, int head_dim,
                       float* power);
// Then, after the prompt's decision: per (layer, head) of c's layout, each channel's key power
// (the sum of k_c^2 over the head's entries, in double) times its query power ranks the channels
// (ascending, ties to the lower channel); the `pruned` lowest are zeroed in every entry's key.
// power: [layer][head][head_dim] (device); c's K rows of T (fp32, fp16, bf16).
void pruneKeyChannels(const EvictionCache& c, const float* power, int pruned);

// Every slot in use of each (layer, head) — its key and value as kv::KVCache::rows gives them, in
// float (an int8 code x step, KIVI's codes decoded, the ring's rows widened) — at row
// table_offset + slot of keys and values (device, head_dim floats a row): the rows a decision
// taken on the host reads (the methods the device does not score). Not for low rank (its K rows
// are coordinates).
void cachedRows(const EvictionCache& c, int head_dim, float* keys, float* values);

// DMS-style evict_below= (kv::Policy::retainKept): an entry whose key is below `threshold` goes
// whatever the budget kept — keep[i] cleared where table[i] < threshold, over the n entries.
void evictBelow(const double* table, int64_t n, double threshold, uint8_t* keep);

// Each head keeps its entries e with keep[table_offset + e]: the others become holes (position
// kEvicted) or, once holes would pass an eighth of the head's slots, every kept entry moves down
// over them, in order, with its position, int8 steps, score and history. Per head (device):
// slots in use after, and entries kept.
void evictionCompact(const EvictionCache& c, const uint8_t* keep, int* new_slots, int* kept);

// KIVI under eviction (kivi_eviction.cu): the same sequence's KIVI storage in every layer, per-layer
// arrays of pointers at the sequence's first head as EvictionCache's. Each head holds coded rows
// in slots [0, coded) — key and value codes (EvictionCache's K / V, code_bytes each), the value's
// (lo, step) pairs, the row's run — whose key pairs are k_params[run] — and its newer rows at full
// precision in slots [coded, length), slot l at ring row l % ring_rows; a pair is pair_bytes (two
// of the cache's elements, cuda::AffinePair). Low rank under eviction
// the same way: its coordinates are the K rows (code_bytes: 2 rank elements), with no V rows (null
// per layer), value pairs, runs or key pairs (null; value_groups and key_groups 0).
struct KiviEviction {
  int head_dim, code_bytes, value_groups, ring_rows, ring_row_bytes;  // ring_row_bytes: head_dim x sizeof(T)
  int pair_bytes;            // 2 x sizeof(T)
  int64_t key_groups;        // runs' key pairs per head
  void* const* k_params;     // per layer: [head][key_groups][head_dim] x (lo, step)
  void* const* v_params;     // per layer: [head][code capacity][value_groups] x (lo, step)
  int* const* run;           // per layer: [head][code capacity]
  void* const* ring_k;       // per layer: [head][ring_rows][head_dim] of T
  void* const* ring_v;
  const int* coded;          // device, per (layer, head): coded slots
  int* run_map;              // device scratch: [layer][head][key_groups]
  void* ring_scratch;        // device scratch: [layer][head][ring_rows] x 2 ring rows
};

// Each head keeps its entries e with keep[table_offset + e], as kv::KVCache::retain thins KIVI's
// runs: a run keeps its key pairs while any of its rows stays, an emptied run goes. Evicted full-
// precision rows are always compacted away (the next runs are the first `group` kept rows after
// the coded ones, as the CPU takes them); evicted coded rows become holes (position kEvicted)
// until they would pass an eighth of the head's slots — or, with `compact_all`, at once — then
// every kept row moves down in order and the runs are renumbered in order. Per (layer, head),
// out[0 .. 5 x layers x heads): slots after, entries kept, coded slots after, runs with a kept row,
// and 1 where the runs were renumbered (then the next run is their count).
void kiviEvictionCompact(const EvictionCache& c, const KiviEviction& k, const uint8_t* keep, bool compact_all, int* out);

// The full-precision rows [coded, length) of each of `heads` heads (device arrays, per head) from
// a ring of from_rows rows to one of to_rows rows (row l at l % rows in each), `row_bytes` each.
void ringResize(const void* from_k, const void* from_v, int from_rows, void* to_k, void* to_v, int to_rows, int heads,
                int row_bytes, const int* coded, const int* length);

}  // namespace kvtp::cuda
