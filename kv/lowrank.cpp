#include "kv/lowrank.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvtp::kv {

std::vector<float> leadingEigenvectors(std::vector<double> a, int n, int r) {
  std::vector<double> v(size_t(n) * n, 0.0);  // accumulated rotations: columns are eigenvectors
  for (int i = 0; i < n; ++i) v[size_t(i) * n + i] = 1.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) off += a[size_t(p) * n + q] * a[size_t(p) * n + q];
    if (off < 1e-22) break;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[size_t(p) * n + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (a[size_t(q) * n + q] - a[size_t(p) * n + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1 : -1) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // a <- J^T a J
          const double akp = a[size_t(k) * n + p], akq = a[size_t(k) * n + q];
          a[size_t(k) * n + p] = c * akp - s * akq;
          a[size_t(k) * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {
          const double apk = a[size_t(p) * n + k], aqk = a[size_t(q) * n + k];
          a[size_t(p) * n + k] = c * apk - s * aqk;
          a[size_t(q) * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          const double vkp = v[size_t(k) * n + p], vkq = v[size_t(k) * n + q];
          v[size_t(k) * n + p] = c * vkp - s * vkq;
          v[size_t(k) * n + q] = s * vkp + c * vkq;
        }
      }
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int i, int j) { return a[size_t(i) * n + i] > a[size_t(j) * n + j]; });
  std::vector<float> basis(size_t(n) * r);
  for (int k = 0; k < r; ++k)
    for (int i = 0; i < n; ++i) basis[size_t(i) * r + k] = float(v[size_t(i) * n + order[k]]);
  return basis;
}

std::vector<float> leftSingularBasis(const float* W, int rows, int cols, int r) {
  std::vector<double> g(size_t(rows) * rows, 0.0);  // W W^T
  for (int i = 0; i < rows; ++i)
    for (int j = i; j < rows; ++j) {
      double s = 0;
      for (int k = 0; k < cols; ++k) s += double(W[size_t(i) * cols + k]) * W[size_t(j) * cols + k];
      g[size_t(i) * rows + j] = g[size_t(j) * rows + i] = s;
    }
  return leadingEigenvectors(std::move(g), rows, r);
}

void coordinates(const float* x, const float* B, int n, int r, float* z) {
  for (int k = 0; k < r; ++k) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double(B[size_t(i) * r + k]) * x[i];
    z[k] = float(s);
  }
}

void reconstruct(const float* z, const float* B, int n, int r, float* x) {
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int k = 0; k < r; ++k) s += double(B[size_t(i) * r + k]) * z[k];
    x[i] = float(s);
  }
}

void projectOnto(float* x, const float* B, int n, int r) {
  std::vector<float> z(static_cast<size_t>(r));
  coordinates(x, B, n, r, z.data());
  reconstruct(z.data(), B, n, r, x);
}

void addLayerBases(LowRankBases& b, const float* wk, const float* wv, int heads, int head_dim, int cols) {
  std::vector<std::vector<float>> keys(static_cast<size_t>(heads)), values(static_cast<size_t>(heads));
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < 2 * heads; ++h) {
    const float* w = (h < heads ? wk : wv) + size_t(h % heads) * head_dim * cols;
    (h < heads ? keys : values)[h % heads] = leftSingularBasis(w, head_dim, cols, b.rank);
  }
  b.keys.insert(b.keys.end(), keys.begin(), keys.end());
  b.values.insert(b.values.end(), values.begin(), values.end());
}

}  // namespace kvtp::kv
