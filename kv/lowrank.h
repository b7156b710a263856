// Low-rank channels (CSKV-style, training-free): a head's keys x W_k^T live in the span of the
// left singular vectors of its rows of W_k, so an old entry can be cached as r coordinates in
// the top-r of them and reconstructed from those. No calibration data (the activation-aware
// variant is not implemented).
#pragma once
#include <vector>

namespace kvtp::kv {

// The r leading eigenvectors of the symmetric n x n matrix `a` (row-major), as the columns of
// an n x r row-major matrix, by cyclic Jacobi rotations (n is a head dimension: <= 256).
std::vector<float> leadingEigenvectors(std::vector<double> a, int n, int r);

// Basis of the top-r left singular vectors of W (rows x cols, row-major): eigenvectors of W W^T.
std::vector<float> leftSingularBasis(const float* W, int rows, int cols, int r);

// z (r) = B^T x: x's coordinates in the basis B (n x r, orthonormal columns).
void coordinates(const float* x, const float* B, int n, int r, float* z);
// x (n) = B z.
void reconstruct(const float* z, const float* B, int n, int r, float* x);
// x (n) <- B B^T x: its projection on the span of the basis B (n x r, orthonormal columns).
void projectOnto(float* x, const float* B, int n, int r);

// Per (layer, local KV head): the key and value bases, and RoPE data to take keys out of (and
// back into) their rotated frame, since W_k acts before the rotation.
struct LowRankBases {
  int rank = 0;
  std::vector<std::vector<float>> keys, values;  // index layer * local_kv_heads + head
  std::vector<float> rope_inv_freq;              // empty: no RoPE (OPT)
};

// Appends one layer's bases to b: head h's from its head_dim rows of the layer's local K and V
// projections wk / wv (rows of `cols`), heads in parallel.
void addLayerBases(LowRankBases& b, const float* wk, const float* wv, int heads, int head_dim, int cols);

}  // namespace kvtp::kv
