// Scores that read a head's cached keys and values when the policy decides (no state between
// steps): a method of this kind is one function from the head's rows to a score per entry, higher
// kept (kvpress's ScorerPress, one selection for all). The budget, scopes, schedule and storage
// forms are the policy's (kv/policy.h); these say only which entries matter.
#pragma once
#include <vector>

#include "kv/kv_cache.h"

namespace kvtp::kv {

// K-norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
// Compression"): keys of low L2 norm draw attention; score = -||k||.
void keyNormScores(const HeadRows& rows, int length, int head_dim, double* out);

// KeyDiff (Park et al. 2025): keys least like the head's average direction are kept;
// score = -cos(k, a), a = the mean of the normalized keys.
void keyDiffScores(const HeadRows& rows, int length, int head_dim, double* out);

// Q-Filters (Godey et al. 2025, "Q-Filters: Leveraging Query-Key Geometry for Efficient
// Key-Value Cache Compression"): a query head's queries lie mostly along one direction, so a key's
// projection on it estimates the attention the key will draw; score = k . filter (post-RoPE keys),
// `filter` the head's, calibrated once per model (QueryFilterCalibration).
void queryFilterScores(const HeadRows& rows, int length, int head_dim, const float* filter, double* out);

// Running statistics of one query head's queries (expected attention's input, pre-RoPE; Q-Filters'
// calibration's Gram matrix, post-RoPE).
struct QueryStats {
  int64_t n = 0;
  std::vector<double> sum, outer;  // sum of q, of q q^T (head_dim x head_dim, row-major)
  void add(const float* q, int head_dim);
};

// Q-Filters' calibration of one KV head, as the authors' make_filters.py: for each of its query
// heads, the top right singular vector v of the matrix of its post-RoPE calibration queries (the
// leading eigenvector of Q^T Q), turned so that most queries project positively on it (their
// majority sign of the first left singular vector); the filter is the mean of those over the KV
// head's query heads. Two passes over the same queries: addGram, then addSigns.
class QueryFilterCalibration {
 public:
  QueryFilterCalibration(int members, int head_dim);
  void addGram(int member, const float* queries, int n);   // pass 1: n rows of head_dim
  void addSigns(int member, const float* queries, int n);  // pass 2 (the directions settled at its first call)
  std::vector<float> filter() const;                       // after pass 2

 private:
  int members_, hd_;
  std::vector<QueryStats> gram_;  // per member: its `outer` is Q^T Q
  std::vector<std::vector<float>> direction_;
  std::vector<int64_t> positive_, total_;
};

// LagKV (Liang et al. 2025): entries after the first `sinks` in partitions of `lag`; each entry of
// a partition is scored against the next partition (its "lag" reference): the standard deviation
// over channels of the entry min-max normalized by the reference's per-channel range, softmax over
// the partition, keys and values averaged, then ranked within the partition (0 .. (lag-1)/lag).
// The sinks and the last partitions without a successor (the tail: lag .. 2 lag - 1 entries)
// score 1, above every ranked entry.
void lagScores(const HeadRows& rows, int length, int head_dim, int sinks, int lag, double* out);

// Leverage (Chari & Van Durme 2025, Compactor; kvpress's LeverageScorePress, exact rather than
// sketched): keys that are geometric outliers among the head's keys carry information others do
// not. On pre-RoPE keys (`rope_inv_freq` non-empty: the cached keys are rotated back by their
// `positions`), centred over the head's entries, X: leverage_i = x_i^T (X^T X)^-1 x_i, then
// z-scored over the head (mean 0, unbiased standard deviation 1).
void leverageScores(const HeadRows& rows, const int* positions, int length, int head_dim,
                    const std::vector<float>& rope_inv_freq, double* out);

// Non-causal chunked attention (Chari & Van Durme 2025, Compactor; kvpress's NonCausalAttnPress):
// the entries in chunks of `span` consecutive entries; each query attends, unscaled, to every key
// of its own entry's chunk, before and after it. attention[i] += what key i receives from its
// chunk's queries — `queries`: (members, T, head_dim) pre-RoPE rows of the head's last T entries
// (one per query head given), rotated here to their entries' positions.
void nonCausalAttention(const HeadRows& rows, const int* positions, int length, int head_dim,
                        const std::vector<float>& queries, int T, const std::vector<float>& rope_inv_freq, int span,
                        double* attention);
// noncausal's score from that attention (summed over every query head of the KV head): times
// ||v||, averaged with its two neighbours (zeros past the ends, as kvpress's pooling), z-scored
// over the head (mean 0, unbiased standard deviation 1).
void nonCausalScores(const HeadRows& rows, int length, int head_dim, const double* attention, double* out);

// Expected attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating
// Attention from Future Queries Distribution"; kvpress's ExpectedAttentionPress with its defaults):
// future queries of each query head are modelled as Gaussian, mean mu and covariance S of the
// queries seen (`members`: the query heads reading this KV head), rotated by RoPE's rotation
// averaged over the next `future` positions from `next_pos` (R; none without RoPE). An entry's
// expected logit is (R mu).k / sqrt(d) + k^T (R S R^T) k / (2 d); softmax over the entries at
// positions >= `sinks` (the sinks score 0: the policy keeps them anyway), summed over the members,
// times ||v||.
void expectedAttentionScores(const HeadRows& rows, const int* positions, int length, int head_dim,
                             const std::vector<QueryStats>& members, const std::vector<float>& rope_inv_freq,
                             int next_pos, int future, int sinks, double* out);

// CUR (Sengupta et al. 2025, CurDKV; kvpress's CURPress with its defaults): approximate leverage
// of keys and values by their squared norms, each normalized over local windows of `local`
// consecutive entries (0: the whole head), multiplied (key x value), normalized to sum 1 over the
// head. The sinks are the policy's to protect.
void curScores(const HeadRows& rows, int length, int head_dim, int local, double* out);

// What the policy does to a head's keys after scoring, and how Scissorhands scores (their CUDA
// twins: kernels/cuda/eviction.cu, tested against these).
// ChunkKV (chunk=): each run of `chunk` consecutive keys from the first takes their mean, summed in order.
void chunkMeans(std::vector<double>& key, int chunk);
// SnapKV / PyramidKV: each key becomes the largest of the `kernel` around it (kernel / 2 each side).
void maxPool(std::vector<double>& key, int kernel);
// Scissorhands (Liu et al. 2023): one query's attention row over a head's n entries appends a bit
// to the history of each entry it sees (probability > 0), set where the entry draws more than the
// row's average (p x visible > 1).
void appendHistoryBits(const float* row, int n, uint64_t* history);

}  // namespace kvtp::kv
