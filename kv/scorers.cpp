#include "kv/scorers.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "kernels/cpu_ops.h"
#include "kv/lowrank.h"

namespace kvtp::kv {
namespace {

// ||x||^2 of a row in double, channel by channel (the order the GPU's K-norm matches).
double squaredNorm(const float* x, int d) {
  double sq = 0;
  for (int i = 0; i < d; ++i) sq += double(x[i]) * x[i];
  return sq;
}

}  // namespace

void keyNormScores(const HeadRows& rows, int length, int head_dim, double* out) {
  for (int i = 0; i < length; ++i) out[i] = -std::sqrt(squaredNorm(rows.keys + int64_t(i) * head_dim, head_dim));
}

void keyDiffScores(const HeadRows& rows, int length, int head_dim, double* out) {
  std::vector<double> anchor(static_cast<size_t>(head_dim), 0.0), norm(static_cast<size_t>(length));
  for (int i = 0; i < length; ++i) {
    const float* k = rows.keys + int64_t(i) * head_dim;
    norm[i] = std::sqrt(squaredNorm(k, head_dim));
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

void queryFilterScores(const HeadRows& rows, int length, int head_dim, const float* filter, double* out) {
  for (int i = 0; i < length; ++i) {
    const float* k = rows.keys + int64_t(i) * head_dim;
    double dot = 0;
    for (int d = 0; d < head_dim; ++d) dot += double(k[d]) * filter[d];
    out[i] = dot;
  }
}

QueryFilterCalibration::QueryFilterCalibration(int members, int head_dim)
    : members_(members), hd_(head_dim), gram_(size_t(members)), direction_(size_t(members)),
      positive_(size_t(members), 0), total_(size_t(members), 0) {}

void QueryFilterCalibration::addGram(int member, const float* q, int n) {
  for (int r = 0; r < n; ++r) gram_[member].add(q + int64_t(r) * hd_, hd_);
}

void QueryFilterCalibration::addSigns(int member, const float* q, int n) {
  if (direction_[member].empty()) direction_[member] = leadingEigenvectors(gram_[member].outer, hd_, 1);
  const std::vector<float>& v = direction_[member];
  for (int r = 0; r < n; ++r) {
    double dot = 0;
    for (int i = 0; i < hd_; ++i) dot += double(q[int64_t(r) * hd_ + i]) * v[i];
    positive_[member] += dot > 0;
    ++total_[member];
  }
}

std::vector<float> QueryFilterCalibration::filter() const {
  std::vector<double> mean(size_t(hd_), 0.0);
  for (int m = 0; m < members_; ++m) {
    if (direction_[m].empty()) throw std::logic_error("QueryFilterCalibration: addSigns before filter");
    // The authors' sign: +1 when more than half of the first left singular vector's entries (the
    // queries' projections) are positive.
    const double sign = 2 * positive_[m] > total_[m] ? 1.0 : -1.0;
    for (int i = 0; i < hd_; ++i) mean[i] += sign * direction_[m][i] / members_;
  }
  return {mean.begin(), mean.end()};
}

void QueryStats::add(const float* q, int head_dim) {
  if (sum.empty()) sum.assign(size_t(head_dim), 0.0), outer.assign(size_t(head_dim) * head_dim, 0.0);
  ++n;
  for (int i = 0; i < head_dim; ++i) {
    sum[i] += q[i];
    for (int j = 0; j < head_dim; ++j) outer[size_t(i) * head_dim + j] += double(q[i]) * q[j];
  }
}

void expectedAttentionScores(const HeadRows& rows, const int* positions, int length, int head_dim,
                             const std::vector<QueryStats>& members, const std::vector<float>& rope_inv_freq,
                             int next_pos, int future, int sinks, double* out) {
  const int d = head_dim, half = d / 2;
  // RoPE's rotation averaged over the future positions: per channel pair (i, i + d/2) the block
  // [[c, -s], [s, c]] with c, s the means of cos and sin of p * theta_i (HF's rotate_half layout).
  std::vector<double> rot(static_cast<size_t>(d) * d, 0.0);
  for (int i = 0; i < d; ++i) rot[size_t(i) * d + i] = 1.0;
  if (!rope_inv_freq.empty())
    for (int i = 0; i < half; ++i) {
      double c = 0, s = 0;
      for (int p = next_pos; p < next_pos + future; ++p)
        c += std::cos(double(p) * rope_inv_freq[i]) / future, s += std::sin(double(p) * rope_inv_freq[i]) / future;
      rot[size_t(i) * d + i] = c, rot[size_t(i) * d + i + half] = -s;
      rot[size_t(i + half) * d + i] = s, rot[size_t(i + half) * d + i + half] = c;
    }
  std::fill(out, out + length, 0.0);
  std::vector<double> mu(static_cast<size_t>(d)), cov(static_cast<size_t>(d) * d), tmp(static_cast<size_t>(d) * d),
      logit(static_cast<size_t>(length));
  for (const QueryStats& m : members) {
    if (m.n == 0) continue;
    // mu = R mean; cov = R (E[q q^T] - mean mean^T) R^T
    std::vector<double> mean(static_cast<size_t>(d));
    for (int i = 0; i < d; ++i) mean[i] = m.sum[i] / double(m.n);
    for (int i = 0; i < d; ++i) {
      mu[i] = 0;
      for (int j = 0; j < d; ++j) mu[i] += rot[size_t(i) * d + j] * mean[j];
    }
    for (int i = 0; i < d; ++i)  // tmp = R C
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int k = 0; k < d; ++k) acc += rot[size_t(i) * d + k] * (m.outer[size_t(k) * d + j] / double(m.n) - mean[k] * mean[j]);
        tmp[size_t(i) * d + j] = acc;
      }
    for (int i = 0; i < d; ++i)  // cov = tmp R^T
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        for (int k = 0; k < d; ++k) acc += tmp[size_t(i) * d + k] * rot[size_t(j) * d + k];
        cov[size_t(i) * d + j] = acc;
      }
    double top = -INFINITY;
    for (int e = 0; e < length; ++e) {
      if (positions[e] < sinks) continue;
      const float* k = rows.keys + int64_t(e) * d;
      double lin = 0, quad = 0;
      for (int i = 0; i < d; ++i) {
        lin += mu[i] * k[i];
        double row = 0;
        for (int j = 0; j < d; ++j) row += cov[size_t(i) * d + j] * k[j];
        quad += k[i] * row;
      }
      logit[e] = lin / std::sqrt(double(d)) + quad / (2.0 * d);
      top = std::max(top, logit[e]);
    }
    double total = 0;
    for (int e = 0; e < length; ++e)
      if (positions[e] >= sinks) total += std::exp(logit[e] - top);
    for (int e = 0; e < length; ++e)
      if (positions[e] >= sinks) out[e] += std::exp(logit[e] - top) / total;
  }
  for (int e = 0; e < length; ++e) out[e] *= std::sqrt(squaredNorm(rows.values + int64_t(e) * d, d));
}

void curScores(const HeadRows& rows, int length, int head_dim, int local, double* out) {
  const int w = local > 0 ? local : std::max(length, 1);
  std::vector<double> k2(static_cast<size_t>(length)), v2(static_cast<size_t>(length));
  for (int i = 0; i < length; ++i) {
    k2[i] = squaredNorm(rows.keys + int64_t(i) * head_dim, head_dim);
    v2[i] = squaredNorm(rows.values + int64_t(i) * head_dim, head_dim);
  }
  for (int b = 0; b < length; b += w) {  // each window's squared norms as shares of the window's
    const int e = std::min(length, b + w);
    for (auto* x : {&k2, &v2}) {
      const double sum = std::accumulate(x->begin() + b, x->begin() + e, 0.0);
      for (int i = b; i < e; ++i) (*x)[i] = sum > 0 ? (*x)[i] / sum : 0.0;
    }
  }
  double total = 0;
  for (int i = 0; i < length; ++i) total += out[i] = k2[i] * v2[i];
  if (total > 0)
    for (int i = 0; i < length; ++i) out[i] /= total;
}

namespace {

// x z-scored in place: mean 0, unbiased standard deviation 1 (at least 1e-6: a constant head stays 0).
void zScore(double* x, int n) {
  if (n < 2) {
    std::fill(x, x + n, 0.0);
    return;
  }
  double m = 0, var = 0;
  for (int i = 0; i < n; ++i) m += x[i] / n;
  for (int i = 0; i < n; ++i) var += (x[i] - m) * (x[i] - m) / (n - 1);
  const double sd = std::max(std::sqrt(var), 1e-6);
  for (int i = 0; i < n; ++i) x[i] = (x[i] - m) / sd;
}

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

void leverageScores(const HeadRows& rows, const int* positions, int length, int head_dim,
                    const std::vector<float>& rope_inv_freq, double* out) {
  const int d = head_dim;
  if (length < 2) {
    std::fill(out, out + length, 0.0);
    return;
  }
  // Pre-RoPE keys, centred.
  std::vector<float> k(rows.keys, rows.keys + int64_t(length) * d);
  for (int i = 0; i < length && !rope_inv_freq.empty(); ++i) {
    const int back = -positions[i];
    kernels::applyRope(k.data() + int64_t(i) * d, 1, 1, d, &back, rope_inv_freq.data());
  }
  std::vector<double> x(k.begin(), k.end()), mean(static_cast<size_t>(d), 0.0);
  for (int i = 0; i < length; ++i)
    for (int c = 0; c < d; ++c) mean[c] += x[size_t(i) * d + c] / length;
  for (int i = 0; i < length; ++i)
    for (int c = 0; c < d; ++c) x[size_t(i) * d + c] -= mean[c];
  // G = X^T X + a little ridge (a rank-deficient head: fewer entries than channels), then its
  // Cholesky factor, G = L L^T.
  std::vector<double> g(size_t(d) * d, 0.0);
  for (int i = 0; i < length; ++i)
    for (int a = 0; a < d; ++a)
      for (int b = 0; b <= a; ++b) g[size_t(a) * d + b] += x[size_t(i) * d + a] * x[size_t(i) * d + b];
  double trace = 0;
  for (int a = 0; a < d; ++a) trace += g[size_t(a) * d + a];
  const double ridge = 1e-6 * trace / d + 1e-12;
  for (int a = 0; a < d; ++a) g[size_t(a) * d + a] += ridge;
  for (int a = 0; a < d; ++a)
    for (int b = 0; b <= a; ++b) {
      double v = g[size_t(a) * d + b];
      for (int c = 0; c < b; ++c) v -= g[size_t(a) * d + c] * g[size_t(b) * d + c];
      g[size_t(a) * d + b] = a == b ? std::sqrt(std::max(v, 1e-300)) : v / g[size_t(b) * d + b];
    }
  // leverage_i = |L^-1 x_i|^2 (forward substitution).
  std::vector<double> y(static_cast<size_t>(d));
  for (int i = 0; i < length; ++i) {
    double s = 0;
    for (int a = 0; a < d; ++a) {
      double v = x[size_t(i) * d + a];
      for (int c = 0; c < a; ++c) v -= g[size_t(a) * d + c] * y[c];
      y[a] = v / g[size_t(a) * d + a];
      s += y[a] * y[a];
    }
    out[i] = s;
  }
  zScore(out, length);
}

void nonCausalAttention(const HeadRows& rows, const int* positions, int length, int head_dim,
                        const std::vector<float>& queries, int T, const std::vector<float>& rope_inv_freq, int span,
                        double* attention) {
  const int d = head_dim, members = T > 0 ? int(queries.size() / (size_t(T) * d)) : 0;
  std::vector<float> q(static_cast<size_t>(d));
  std::vector<double> logit(static_cast<size_t>(span));
  for (int m = 0; m < members; ++m)
    for (int t = 0; t < T; ++t) {
      const int e = length - T + t;  // the query's own entry
      if (e < 0) continue;
      std::copy_n(queries.data() + (int64_t(m) * T + t) * d, d, q.data());
      if (!rope_inv_freq.empty()) kernels::applyRope(q.data(), 1, 1, d, &positions[e], rope_inv_freq.data());
      const int first = e / span * span, end = std::min(length, first + span);
      double top = -INFINITY;
      for (int j = first; j < end; ++j) {
        double z = 0;
        for (int c = 0; c < d; ++c) z += double(q[c]) * rows.keys[int64_t(j) * d + c];
        top = std::max(top, logit[j - first] = z);
      }
      double sum = 0;
      for (int j = first; j < end; ++j) sum += logit[j - first] = std::exp(logit[j - first] - top);
      for (int j = first; j < end; ++j) attention[j] += logit[j - first] / sum;
    }
}

void nonCausalScores(const HeadRows& rows, int length, int head_dim, const double* attention, double* out) {
  std::vector<double> s(static_cast<size_t>(length));
  for (int i = 0; i < length; ++i)
    s[i] = attention[i] * std::sqrt(squaredNorm(rows.values + int64_t(i) * head_dim, head_dim));
  for (int i = 0; i < length; ++i)
    out[i] = ((i > 0 ? s[i - 1] : 0.0) + s[i] + (i + 1 < length ? s[i + 1] : 0.0)) / 3;
  zScore(out, length);
}

void chunkMeans(std::vector<double>& key, int chunk) {
  const int n = int(key.size());
  for (int b = 0; b < n; b += chunk) {
    const int e = std::min(n, b + chunk);
    const double mean = std::accumulate(key.begin() + b, key.begin() + e, 0.0) / (e - b);
    std::fill(key.begin() + b, key.begin() + e, mean);
  }
}

void maxPool(std::vector<double>& key, int kernel) {
  const std::vector<double> raw = key;
  const int n = int(key.size());
  for (int i = 0; i < n; ++i)
    key[i] = *std::max_element(raw.begin() + std::max(0, i - kernel / 2), raw.begin() + std::min(n, i + kernel / 2 + 1));
}

void appendHistoryBits(const float* row, int n, uint64_t* history) {
  int visible = 0;  // keys this query could see: its own position and before
  for (int i = 0; i < n; ++i) visible += row[i] > 0.0f;
  for (int i = 0; i < n; ++i)
    if (row[i] > 0.0f) history[i] = (history[i] << 1) | (row[i] * visible > 1.0f ? 1u : 0u);
}

}  // namespace kvtp::kv
