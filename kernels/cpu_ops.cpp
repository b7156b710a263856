#include "kernels/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvtp::kernels {

void linear(const float* x, int T, int in, const float* W, int out, const float* b, float* y,
            bool accumulate) {
  float beta = accumulate ? 1.0f : 0.0f;
  if (b) {
    if (!accumulate) {
      for (int t = 0; t < T; ++t) std::copy(b, b + out, y + int64_t(t) * out);
    } else {
      for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) y[int64_t(t) * out + o] += b[o];
    }
    beta = 1.0f;
  }
  if (T == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, W, in, x, 1, beta, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, x, in, W, in, beta, y, out);
  }
}

void layerNorm(const float* x, int T, int dim, const float* w, const float* b, float eps, float* y) {
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* r = x + int64_t(t) * dim;
    float* o = y + int64_t(t) * dim;
    double mean = 0, var = 0;
    for (int i = 0; i < dim; ++i) mean += r[i];
    mean /= dim;
    for (int i = 0; i < dim; ++i) var += (r[i] - mean) * (r[i] - mean);
    const float inv = float(1.0 / std::sqrt(var / dim + eps));
    for (int i = 0; i < dim; ++i) o[i] = (r[i] - float(mean)) * inv * w[i] + b[i];
  }
}

void rmsNorm(const float* x, int T, int dim, const float* w, float eps, float* y) {
#pragma omp parallel for if (T > 16)
  for (int t = 0; t < T; ++t) {
    const float* r = x + int64_t(t) * dim;
    float* o = y + int64_t(t) * dim;
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(r[i]) * r[i];
    const float inv = float(1.0 / std::sqrt(ss / dim + eps));
    for (int i = 0; i < dim; ++i) o[i] = w[i] * (r[i] * inv);
  }
}

void addInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void relu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void siluMul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void applyRope(float* x, int T, int heads, int head_dim, const int* positions, const float* inv_freq) {
  const int half = head_dim / 2;
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < half; ++i) {
      // Angles in double: positions reach 1e5+, where float angles lose the low bits.
      const double angle = double(positions[t]) * inv_freq[i];
      const float c = float(std::cos(angle)), s = float(std::sin(angle));
      for (int h = 0; h < heads; ++h) {
        float* v = x + int64_t(t) * heads * head_dim + int64_t(h) * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void attendHead(const float* q, int q_stride, const int* q_pos, int T, const float* K, const float* V,
                const int* k_pos, int L, int head_dim, float scale, float* out, int out_stride,
                float* probs) {
  // Query rows go in blocks; a block reads only the key prefix its last query can see (keys are
  // ascending by position), which skips the masked half of a causal prefill.
  constexpr int kBlock = 64;
  thread_local std::vector<float> scratch;
  scratch.resize(size_t(std::min(T, kBlock)) * L);
  for (int t0 = 0; t0 < T; t0 += kBlock) {
    const int bt = std::min(kBlock, T - t0);
    const int max_pos = *std::max_element(q_pos + t0, q_pos + t0 + bt);
    const int Lb = int(std::upper_bound(k_pos, k_pos + L, max_pos) - k_pos);
    float* S = scratch.data();
    if (Lb > 0) {
      // S (bt, Lb) = scale * Q K^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bt, Lb, head_dim, scale, q + int64_t(t0) * q_stride,
                  q_stride, K, head_dim, 0.0f, S, Lb);
    }
    for (int t = 0; t < bt; ++t) {
      float* row = S + int64_t(t) * Lb;
      const int p = q_pos[t0 + t];
      float mx = -std::numeric_limits<float>::infinity();
      for (int l = 0; l < Lb; ++l)
        if (k_pos[l] <= p) mx = std::max(mx, row[l]);
      double sum = 0;
      for (int l = 0; l < Lb; ++l) {
        row[l] = k_pos[l] <= p ? std::exp(row[l] - mx) : 0.0f;
        sum += row[l];
      }
      const float inv = sum > 0 ? float(1.0 / sum) : 0.0f;
      for (int l = 0; l < Lb; ++l) row[l] *= inv;
      if (probs) {
        float* pr = probs + int64_t(t0 + t) * L;
        std::copy(row, row + Lb, pr);
        std::fill(pr + Lb, pr + L, 0.0f);
      }
    }
    float* o = out + int64_t(t0) * out_stride;
    if (Lb > 0) {
      // O (bt, hd) = P V
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bt, head_dim, Lb, 1.0f, S, Lb, V, head_dim, 0.0f, o,
                  out_stride);
    } else {
      for (int t = 0; t < bt; ++t) std::fill(o + int64_t(t) * out_stride, o + int64_t(t) * out_stride + head_dim, 0.0f);
    }
  }
}

void SoftmaxPartial::combine(const SoftmaxPartial& o) {
  const float m = std::max(max, o.max);
  sum = sum * std::exp(double(max) - m) + o.sum * std::exp(double(o.max) - m);
  max = m;
  if (o.has_target) {
    target = o.target;
    has_target = true;
  }
}

double SoftmaxPartial::logprob() const { return double(target) - double(max) - std::log(sum); }

void softmaxPartials(const float* logits, int T, int V_shard, int vocab_offset, const int* targets,
                     SoftmaxPartial* out) {
#pragma omp parallel for if (T > 4)
  for (int t = 0; t < T; ++t) {
    const float* row = logits + int64_t(t) * V_shard;
    SoftmaxPartial p;
    p.max = *std::max_element(row, row + V_shard);
    double sum = 0;
    for (int v = 0; v < V_shard; ++v) sum += std::exp(double(row[v] - p.max));
    p.sum = sum;
    const int local = targets[t] - vocab_offset;
    if (local >= 0 && local < V_shard) {
      p.target = row[local];
      p.has_target = true;
    }
    out[t] = p;
  }
}

}  // namespace kvtp::kernels
