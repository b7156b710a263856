#include "kv/scorers.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvtp::kv {

void keyNormScores(const HeadRows& rows, int length, int head_dim, double* out) {
  for (int i = 0; i < length; ++i) {
    const float* k = rows.keys + int64_t(i) * head_dim;
    double sq = 0;
    for (int d = 0; d < head_dim; ++d) sq += double(k[d]) * k[d];
    out[i] = -std::sqrt(sq);
  }
}

void keyDiffScores(const HeadRows& rows, int length, int head_dim, double* out) {
  std::vector<double> anchor(static_cast<size_t>(head_dim), 0.0), norm(static_cast<size_t>(length));
  for (int i = 0; i < length; ++i) {
    const float* k = rows.keys + int64_t(i) * head_dim;
    double sq = 0;
    for (int d = 0; d < head_dim; ++d) sq += double(k[d]) * k[d];
    norm[i] = std::sqrt(sq);
    for (int d = 0; d < head_dim; ++d) anchor[d] += norm[i] > 0 ? k[d] / norm[i] / length : 0.0;
  }
  const double anchor_norm = std::sqrt(std::inner_product(anchor.begin(), anchor.end(), anchor.begin(), 0.0));
  for (int i = 0; i < length; ++i) {
    const float* k = rows.keys + int64_t(i) * head_dim;
    double dot = 0;
    for (int d = 0; d < head_dim; ++d) dot += k[d] * anchor[d];
    out[i] = norm[i] > 0 && anchor_norm > 0 ? -dot / (norm[i] * anchor_norm) : 0.0;
  }
}

namespace {

// One partition's entries [begin, begin + lag) of `x` against the reference [begin + lag,
// begin + 2 lag): per entry, the standard deviation over channels of (x - min) / (max - min), the
// reference's range per channel; softmax over the partition, into `out`.
void lagStateScores(const float* x, int head_dim, int begin, int lag, double* out) {
  std::vector<float> lo(static_cast<size_t>(head_dim), INFINITY), hi(static_cast<size_t>(head_dim), -INFINITY);
  for (int r = begin + lag; r < begin + 2 * lag; ++r)
    for (int d = 0; d < head_dim; ++d) {
      lo[d] = std::min(lo[d], x[int64_t(r) * head_dim + d]);
      hi[d] = std::max(hi[d], x[int64_t(r) * head_dim + d]);
    }
  double top = -INFINITY;
  for (int i = 0; i < lag; ++i) {
    const float* v = x + int64_t(begin + i) * head_dim;
    double mean = 0, sq = 0;
    for (int d = 0; d < head_dim; ++d) {
      const double range = double(hi[d]) - lo[d];
      const double t = range > 0 ? (v[d] - lo[d]) / range : 0.0;
      mean += t, sq += t * t;
    }
    mean /= head_dim;
    // torch.std: the unbiased estimate (n - 1)
    out[i] = head_dim > 1 ? std::sqrt(std::max(0.0, (sq - head_dim * mean * mean) / (head_dim - 1))) : 0.0;
    top = std::max(top, out[i]);
  }
  double total = 0;
  for (int i = 0; i < lag; ++i) total += out[i] = std::exp(out[i] - top);
  for (int i = 0; i < lag; ++i) out[i] /= total;
}

}  // namespace

void lagScores(const HeadRows& rows, int length, int head_dim, int sinks, int lag, double* out) {
  std::fill(out, out + length, 1.0);
  if (lag < 1 || length < sinks + 2 * lag) return;  // no partition has a reference yet
  const int partitions = (length - sinks) / lag - 1;  // those with a successor
  std::vector<double> k(static_cast<size_t>(lag)), v(static_cast<size_t>(lag)), s(static_cast<size_t>(lag));
  std::vector<int> order(static_cast<size_t>(lag));
  for (int p = 0; p < partitions; ++p) {
    const int begin = sinks + p * lag;
    lagStateScores(rows.keys, head_dim, begin, lag, k.data());
    lagStateScores(rows.values, head_dim, begin, lag, v.data());
    for (int i = 0; i < lag; ++i) s[i] = (k[i] + v[i]) / 2;
    // The rank of each entry within its partition (argsort of argsort), over lag.
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] < s[b]; });
    for (int r = 0; r < lag; ++r) out[begin + order[r]] = double(r) / lag;
  }
}

}  // namespace kvtp::kv
