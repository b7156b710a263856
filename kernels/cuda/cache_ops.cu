// Kernels of the device KV cache in its compressed forms (cache_ops.h): int8 rows appended and
// staged, KIVI's ring, runs and stage, low rank's projection and reconstruction, compaction. Each
// does kv::KVCache's arithmetic on the CPU (kv/kv_cache.cpp), so both hold the same bytes.
#include <algorithm>
#include <stdexcept>

#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/device_util.cuh"

namespace kvtp::cuda {

// Gathers the kept rows of every head into `scratch`, then back to the head's first slots.
template <class T>
__global__ void gatherRows(const T* K, const T* V, const int* k_pos, int64_t capacity, int hd, const int* keep,
                           const int* kept, int max_kept, T* sk, T* sv, int* sp) {
  const int g = blockIdx.y, j = blockIdx.x;
  if (j >= kept[g]) return;
  const int64_t from = g * capacity + keep[int64_t(g) * max_kept + j], to = int64_t(g) * max_kept + j;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    sk[to * hd + d] = K[from * hd + d];
    sv[to * hd + d] = V[from * hd + d];
  }
  if (threadIdx.x == 0 && k_pos) sp[to] = k_pos[from];
}

template <class T>
__global__ void scatterRows(T* K, T* V, int* k_pos, int64_t capacity, int hd, const int* kept, int max_kept,
                            const T* sk, const T* sv, const int* sp) {
  const int g = blockIdx.y, j = blockIdx.x;
  if (j >= kept[g]) return;
  const int64_t to = g * capacity + j, from = int64_t(g) * max_kept + j;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    K[to * hd + d] = sk[from * hd + d];
    V[to * hd + d] = sv[from * hd + d];
  }
  if (threadIdx.x == 0 && k_pos) k_pos[to] = sp[from];
}

// kv::encodeInt8: round(x / step) (half to even, as nearbyint) into [-127, 127], 0 for a zero row.
__device__ float encodeInt8(float x, float step) {
  return step > 0.0f ? fminf(fmaxf(rintf(x / step), -127.0f), 127.0f) : 0.0f;
}

// One warp per (new row t, KV head g, key or value): the row's step = max|x| / 127 and its codes
// (kv::fitInt8 / encodeInt8) at slot first_slots[g] + t; the key's warp writes the position.
__global__ void quantizeAppendKernel(Int8Append a) {
  const int t = blockIdx.x, g = blockIdx.y, is_v = blockIdx.z, lane = threadIdx.x;
  const float* x = a.qkv + int64_t(t) * a.qkv_stride + (is_v ? a.v_offset : a.k_offset) + g * a.head_dim;
  float mx = 0.0f;
  for (int c = lane; c < a.head_dim; c += 32) mx = fmaxf(mx, fabsf(x[c]));
  const float step = warpMax(mx) / 127.0f;
  const int64_t slot = newRow(a, t, g, int(gridDim.y));
  int8_t* codes = (is_v ? a.V : a.K) + slot * a.head_dim;
  for (int c = lane; c < a.head_dim; c += 32)
    codes[c] = int8_t(encodeInt8(x[c], step));
  if (lane == 0) (is_v ? a.v_step : a.k_step)[slot] = step;
  if (lane == 0 && !is_v) a.k_pos[slot] = a.positions[t];
}

// Rows [0, count) of every KV head of an int8 cache back to full precision in T, with their
// positions, into a (kv_heads, stage_capacity) stage.
template <class T>
__global__ void dequantizeKernel(Int8Append a, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  const int l = blockIdx.x, g = blockIdx.y;
  if (l >= count) return;
  const int64_t from = g * a.capacity + l, to = g * stage_capacity + l;
  for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) {
    K[to * a.head_dim + c] = fromFloat<T>(float(a.K[from * a.head_dim + c]) * a.k_step[from]);
    V[to * a.head_dim + c] = fromFloat<T>(float(a.V[from * a.head_dim + c]) * a.v_step[from]);
  }
  if (threadIdx.x == 0) k_pos[to] = a.k_pos[from];
}

// One block per (new row t, KV head g, key or value): the row into the ring, the key's block
// writing the position.
template <class T>
__global__ void kiviAppendKernel(KiviCache<T> c, const float* qkv, int64_t qkv_stride, int64_t k_offset,
                                 int64_t v_offset, const int* first_slots, const int* positions,
                                 bool rows_are_sequences) {
  const int t = blockIdx.x, g = blockIdx.y, is_v = blockIdx.z;
  const int64_t head = rows_are_sequences ? int64_t(t) * gridDim.y + g : g;
  const int slot = first_slots[head] + (rows_are_sequences ? 0 : t);
  const float* x = qkv + int64_t(t) * qkv_stride + (is_v ? v_offset : k_offset) + int64_t(g) * c.head_dim;
  T* row = (is_v ? c.ring.v : c.ring.k) + c.ring.at(head, slot);
  for (int ch = threadIdx.x; ch < c.head_dim; ch += blockDim.x) row[ch] = fromFloat<T>(x[ch]);
  if (threadIdx.x == 0 && !is_v) c.k_pos[head * c.pos_capacity + slot] = positions[t];
}

// kv::encodeAffine: round((x - lo) / step) into [0, 2^bits - 1], 0 when every value equals lo.
__device__ int encodeAffine(float x, float lo, float step, int bits) {
  if (step <= 0.0f) return 0;
  return int(fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, lo), step)), 0.0f), float((1 << bits) - 1)));
}

// One block per (run j, KV head h), a thread per channel: rows [first, first + group) with first =
// quantized[h] + j * group, if the run ends by quantized_after[h]; it becomes the head's run
// first / group (under eviction runs[h] + j, recorded per row). Keys: (lo, step) per channel over
// the run (kv::fitAffine), values: per row over groups of `group` channels, each pair rounded to T
// and the codes encoded against it (AffinePair); then each row's codes packed, a thread per byte.
template <class T>
__device__ void quantizeRun(const KiviCache<T>& c, const T* stage_k, const T* stage_v, int64_t stage_capacity) {
  const int h = blockIdx.y, ch = threadIdx.x, hd = c.head_dim, G = c.group, bits = c.bits;
  const int first = c.quantized[h] + int(blockIdx.x) * G;
  if (first + G > c.quantized_after[h]) return;
  const int run = c.runs ? c.runs[h] + int(blockIdx.x) : first / G;
  const float levels = float((1 << bits) - 1);
  auto source = [&](bool value, int l) -> const T* {  // row l of head h: the stage's, else the ring's
    if (stage_k) return (value ? stage_v : stage_k) + (h * stage_capacity + l) * hd;
    return (value ? c.ring.v : c.ring.k) + c.ring.at(h, l);
  };
  float k_lo = 0.0f, k_step = 0.0f;
  if (ch < hd) {
    float lo = toFloat(source(false, first)[ch]), hi = lo;
    for (int l = first + 1; l < first + G; ++l) {
      const float x = toFloat(source(false, l)[ch]);
      lo = fminf(lo, x), hi = fmaxf(hi, x);
    }
    const auto pair = AffinePair<T>::rounded(lo, __fdiv_rn(__fsub_rn(hi, lo), levels));
    c.k_params[(int64_t(h) * c.keyGroups() + run) * hd + ch] = pair;
    k_lo = pair.get().x, k_step = pair.get().y;
  }
  if (c.run)
    for (int i = ch; i < G; i += blockDim.x) c.run[int64_t(h) * c.capacity + first + i] = run;
  __shared__ float value[256];
  __shared__ float2 v_affine[256];
  __shared__ uint8_t k_code[256], v_code[256];
  const int VG = c.valueGroups(), cb = c.codeBytes();
  for (int l = first; l < first + G; ++l) {
    const int64_t row = int64_t(h) * c.capacity + l;
    if (ch < hd) {
      k_code[ch] = uint8_t(encodeAffine(toFloat(source(false, l)[ch]), k_lo, k_step, bits));
      value[ch] = toFloat(source(true, l)[ch]);
    }
    __syncthreads();
    if (ch < VG) {  // value group ch: channels [ch G, min(ch G + G, hd))
      const int from = ch * G, to = min(from + G, hd);
      float lo = value[from], hi = lo;
      for (int i = from + 1; i < to; ++i) lo = fminf(lo, value[i]), hi = fmaxf(hi, value[i]);
      const auto pair = AffinePair<T>::rounded(lo, __fdiv_rn(__fsub_rn(hi, lo), levels));
      c.v_params[row * VG + ch] = pair;
      v_affine[ch] = pair.get();
    }
    __syncthreads();
    if (ch < hd) {
      const float2 a = v_affine[ch / G];
      v_code[ch] = uint8_t(encodeAffine(value[ch], a.x, a.y, bits));
    }
    __syncthreads();
    if (ch < cb) {  // byte ch holds channels ch * 8 / bits .. (ch + 1) * 8 / bits - 1, low bits first
      uint8_t kb = 0, vb = 0;
      for (int i = ch * 8 / bits; i < min((ch + 1) * 8 / bits, hd); ++i) {
        kb |= uint8_t(k_code[i] << (i * bits % 8));
        vb |= uint8_t(v_code[i] << (i * bits % 8));
      }
      c.K[row * cb + ch] = kb, c.V[row * cb + ch] = vb;
    }
    __syncthreads();
  }
}

template <class T>
__global__ void kiviQuantizeKernel(KiviCache<T> c, const T* stage_k, const T* stage_v, int64_t stage_capacity) {
  quantizeRun(c, stage_k, stage_v, stage_capacity);
}

// The same for every layer at once (blockIdx.z: the layer): a run's rows go one after another,
// so a launch a layer left each layer's ~40 us of latency in a row (KIVI under eviction at 32
// layers: 1.2 ms a step).
template <class T>
__global__ void kiviQuantizeLayersKernel(const KiviCache<T>* layers) {
  quantizeRun(layers[blockIdx.z], static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), 0);
}

// After a stage's step: each head's rows [quantized_after, length) into the ring, and the
// positions of rows first_new.. into k_pos (grid-stride over rows).
template <class T>
__global__ void kiviKeepKernel(KiviCache<T> c, const T* stage_k, const T* stage_v, const int* stage_pos,
                               int64_t stage_capacity, const int* lengths, int first_new) {
  const int h = blockIdx.y, hd = c.head_dim, keep_from = c.quantized_after[h];
  for (int l = min(keep_from, first_new) + blockIdx.x; l < lengths[h]; l += gridDim.x) {
    const int64_t from = h * stage_capacity + l;
    if (l >= keep_from) c.ring.put(h, l, stage_k + from * hd, stage_v + from * hd);
    if (l >= first_new && threadIdx.x == 0) c.k_pos[int64_t(h) * c.pos_capacity + l] = stage_pos[from];
  }
}

template <class T>
__global__ void kiviRowsKernel(KiviCache<T> c, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  const int l = blockIdx.x, h = blockIdx.y, hd = c.head_dim;
  if (l >= count) return;
  const int64_t to = h * stage_capacity + l, row = int64_t(h) * c.capacity + l;
  const bool coded = l < c.quantized[h];
  for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
    if (coded) {
      K[to * hd + ch] = fromFloat<T>(KiviCache<T>::decode(c.keyParams(h, l, ch), c.code(c.K + row * c.codeBytes(), ch)));
      V[to * hd + ch] = fromFloat<T>(KiviCache<T>::decode(c.valueParams(h, l, ch), c.code(c.V + row * c.codeBytes(), ch)));
    } else {
      const int64_t ring_row = c.ring.at(h, l);
      K[to * hd + ch] = c.ring.k[ring_row + ch], V[to * hd + ch] = c.ring.v[ring_row + ch];
    }
  }
  if (threadIdx.x == 0) k_pos[to] = c.k_pos[int64_t(h) * c.pos_capacity + l];
}

template <class T>
void kiviAppend(const KiviCache<T>& c, int rows, int kv_heads, const float* qkv, int64_t qkv_stride, int64_t k_offset,
                int64_t v_offset, const int* first_slots, const int* positions, bool rows_are_sequences) {
  if (rows == 0) return;
  kiviAppendKernel<<<dim3(rows, kv_heads, 2), std::min(c.head_dim, 128)>>>(c, qkv, qkv_stride, k_offset, v_offset,
                                                                           first_slots, positions, rows_are_sequences);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void kiviSettle(const KiviCache<T>& c, int kv_heads, int max_runs, const T* stage_k, const T* stage_v,
                const int* stage_pos, int64_t stage_capacity, const int* lengths, int first_new) {
  if (c.head_dim > 256) throw std::runtime_error("kiviSettle: head_dim above 256");
  if (max_runs > 0) {
    kiviQuantizeKernel<<<dim3(max_runs, kv_heads), std::max(32, c.head_dim)>>>(c, stage_k, stage_v, stage_capacity);
    KVTP_CUDA_LAUNCHED();
  }
  if (stage_k) {
    kiviKeepKernel<<<dim3(64, kv_heads), std::min(c.head_dim, 128)>>>(c, stage_k, stage_v, stage_pos, stage_capacity,
                                                                     lengths, first_new);
    KVTP_CUDA_LAUNCHED();
  }
}

template <class T>
void kiviSettleLayers(const KiviCache<T>* layers, int count, int kv_heads, int max_runs, int head_dim) {
  if (head_dim > 256) throw std::runtime_error("kiviSettleLayers: head_dim above 256");
  if (max_runs == 0 || count == 0) return;
  kiviQuantizeLayersKernel<<<dim3(max_runs, kv_heads, count), std::max(32, head_dim)>>>(layers);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void kiviRows(const KiviCache<T>& c, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  if (count == 0) return;
  kiviRowsKernel<<<dim3(count, kv_heads), std::min(c.head_dim, 128)>>>(c, count, K, V, k_pos, stage_capacity);
  KVTP_CUDA_LAUNCHED();
}

// kernels::applyRope on the channel pair (a, b) = (x[i], x[i + half]) at position p. The CPU takes
// cos and sin of the angle in double; here the angle is formed and reduced to [-pi, pi] in double
// (float angles lose the low bits past a few thousand positions), then its sine and cosine come
// from the special function units (absolute error ~4e-7 there, below fp16's rounding; the stage
// rotates every row of every step, where a double sincos cost 2.5x the row's memory time).
__device__ float2 ropePair(float a, float b, int p, float inv_freq) {
  constexpr double kTwoPi = 6.283185307179586476925, kInvTwoPi = 0.15915494309189533577;
  const double angle = double(p) * inv_freq;
  float sn, cs;
  __sincosf(float(fma(-kTwoPi, rint(angle * kInvTwoPi), angle)), &sn, &cs);
  return {a * cs - b * sn, b * cs + a * sn};
}

// Low rank's window held as int8 (LowRankCache::int8): a ring row's head_dim codes, then their step.
template <class T>
__device__ float windowChannel(const LowRankCache<T>& c, const T* row, int ch) {
  if (!c.int8) return toFloat(row[ch]);
  const int8_t* codes = reinterpret_cast<const int8_t*>(row);
  return __fmul_rn(float(codes[ch]), *reinterpret_cast<const float*>(codes + c.head_dim));
}

// x (head_dim floats, shared) through int8 and back as kv::fitInt8 / encodeInt8 and the decode
// (the step max|x| / 127); into `codes` and `step` too when given.
// Every thread of the block calls it.
__device__ void int8RoundTrip(float* x, int head_dim, int8_t* codes = nullptr, float* step_out = nullptr) {
  float mx = 0.0f;
  for (int ch = threadIdx.x; ch < head_dim; ch += blockDim.x) mx = fmaxf(mx, fabsf(x[ch]));
  const float step = blockReduce(mx, warpMax, 0.0f) / 127.0f;
  for (int ch = threadIdx.x; ch < head_dim; ch += blockDim.x) {
    const float code = encodeInt8(x[ch], step);
    if (codes) codes[ch] = int8_t(code);
    x[ch] = __fmul_rn(code, step);
  }
  if (step_out && threadIdx.x == 0) *step_out = step;
  __syncthreads();
}

// The stage after lowRankRows' products: rows below `projected` rotated to their positions
// (kv::KVCache::rows), rows up to counts[h] copied from the ring. A thread per channel pair
// (i, i + half) of a row, the block's threads over consecutive rows, grid-stride over rows.
template <class T>
__global__ void lowRankFinishKernel(LowRankCache<T> c, const int* counts, T* K, T* V) {
  const int h = blockIdx.y, hd = c.head_dim, half = hd / 2, projected = c.projected[h];
  const int per_block = blockDim.x / half, i = threadIdx.x % half;
  if (threadIdx.x >= per_block * half) return;
  for (int l = blockIdx.x * per_block + threadIdx.x / half; l < counts[h]; l += gridDim.x * per_block) {
    const int64_t row = (int64_t(h) * c.capacity + l) * hd;
    T* k = K + row;
    if (l < projected) {
      if (!c.inv_freq) continue;
      const float2 x = ropePair(toFloat(k[i]), toFloat(k[i + half]), c.k_pos[int64_t(h) * c.capacity + l], c.inv_freq[i]);
      k[i] = fromFloat<T>(x.x), k[i + half] = fromFloat<T>(x.y);
    } else {
      const int64_t from = c.ring.at(h, l);
      for (int ch : {i, i + half})
        k[ch] = fromFloat<T>(windowChannel(c, c.ring.k + from, ch)),
        V[row + ch] = fromFloat<T>(windowChannel(c, c.ring.v + from, ch));
    }
  }
}

// Rows [projected, projected_after) of each head (blockIdx.y) from the stage (null: from the ring)
// to coordinates: the key taken out of its rotation (RoPE at -position), then z = B^T x for key
// and value, a thread per coordinate; then the rows the ring keeps. Grid-stride over rows.
template <class T>
__global__ void lowRankSettleKernel(LowRankCache<T> c, const T* K, const T* V, const int* first_new,
                                    const int* lengths) {
  extern __shared__ float kv_row[];  // the row's key then value, float
  const int h = blockIdx.y, hd = c.head_dim, half = hd / 2, r = c.rank;
  const int64_t basis = int64_t(h % c.kv_heads) * hd * r;
  for (int l = c.projected[h] + blockIdx.x; l < c.projected_after[h]; l += gridDim.x) {
    const int64_t row = int64_t(h) * c.capacity + l;
    if (K) {
      for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
        kv_row[ch] = toFloat(K[row * hd + ch]), kv_row[hd + ch] = toFloat(V[row * hd + ch]);
      __syncthreads();
      if (c.int8 && l >= first_new[h]) int8RoundTrip(kv_row, hd), int8RoundTrip(kv_row + hd, hd);
    } else {
      const int64_t at = c.ring.at(h, l);
      for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
        kv_row[ch] = windowChannel(c, c.ring.k + at, ch), kv_row[hd + ch] = windowChannel(c, c.ring.v + at, ch);
      __syncthreads();
    }
    if (c.inv_freq)
      for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float2 x = ropePair(kv_row[i], kv_row[i + half], -c.k_pos[row], c.inv_freq[i]);
        kv_row[i] = x.x, kv_row[i + half] = x.y;
      }
    __syncthreads();
    for (int j = threadIdx.x; j < 2 * r; j += blockDim.x) {  // kv::coordinates
      const bool value = j >= r;
      const T* B = (value ? c.value_basis : c.key_basis) + basis + (value ? j - r : j);
      const float* x = kv_row + (value ? hd : 0);
      double z = 0;
      for (int i = 0; i < hd; ++i) z += double(toFloat(B[int64_t(i) * r])) * x[i];
      c.coords[row * 2 * r + j] = fromFloat<T>(float(z));
    }
    __syncthreads();
  }
  for (int l = max(c.projected_after[h], first_new[h]) + blockIdx.x; l < lengths[h]; l += gridDim.x) {
    const int64_t from = (int64_t(h) * c.capacity + l) * hd;
    if (!c.int8) {
      c.ring.put(h, l, K + from, V + from);
      continue;
    }
    for (int ch = threadIdx.x; ch < hd; ch += blockDim.x)
      kv_row[ch] = toFloat(K[from + ch]), kv_row[hd + ch] = toFloat(V[from + ch]);
    __syncthreads();
    for (int value = 0; value < 2; ++value) {
      int8_t* codes = reinterpret_cast<int8_t*>((value ? c.ring.v : c.ring.k) + c.ring.at(h, l));
      int8RoundTrip(kv_row + value * hd, hd, codes, reinterpret_cast<float*>(codes + hd));
    }
  }
}

template <class T>
void lowRankRows(const Blas& blas, const LowRankCache<T>& c, int heads, int rows, const int* counts, T* K, T* V) {
  if (rows == 0 || heads == 0) return;
  const float one = 1.0f, zero = 0.0f;
  const int hd = c.head_dim, r = c.rank;
  // Per sequence (a batch's heads reuse the layer's bases): stage (rows, hd) = Z (rows, r) B^T,
  // Z a row's key or value coordinates, B (hd, r) — column-major, C^T = B Z^T.
  for (int first = 0; first < heads; first += c.kv_heads)
    for (int value = 0; value < 2; ++value) {
      const T* B = value ? c.value_basis : c.key_basis;
      const T* Z = c.coords + int64_t(first) * c.capacity * 2 * r + (value ? r : 0);
      T* out = (value ? V : K) + int64_t(first) * c.capacity * hd;
      KVTP_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, hd, rows, r, &one, B, dataType<T>(), r, int64_t(hd) * r, Z,
          dataType<T>(), 2 * r, c.capacity * 2 * r, &zero, out, dataType<T>(), hd, c.capacity * hd,
          std::min(c.kv_heads, heads - first), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  const int threads = std::max(128, hd / 2), per_block = threads / (hd / 2);
  lowRankFinishKernel<<<dim3(std::min((rows + per_block - 1) / per_block, 2048), heads), threads>>>(c, counts, K, V);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void lowRankSettle(const LowRankCache<T>& c, int heads, int max_rows, const T* K, const T* V, const int* first_new,
                   const int* lengths) {
  if (heads == 0) return;
  lowRankSettleKernel<<<dim3(std::clamp(max_rows, 1, 512), heads), 128, 2 * c.head_dim * sizeof(float)>>>(
      c, K, V, first_new, lengths);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void compactKV(T* K, T* V, int* k_pos, int64_t capacity, int kv_heads, int head_dim, const int* keep, const int* kept,
               int max_kept) {
  if (max_kept == 0) return;
  static thread_local DeviceBuffer<char> scratch;
  const size_t rows = size_t(kv_heads) * max_kept;
  char* base = grow(scratch, rows * (2 * head_dim * sizeof(T) + sizeof(int)));
  T* sk = reinterpret_cast<T*>(base);
  T* sv = sk + rows * head_dim;
  int* sp = reinterpret_cast<int*>(sv + rows * head_dim);
  const dim3 grid(max_kept, kv_heads);
  const int threads = std::min(head_dim, 128);
  gatherRows<<<grid, threads>>>(K, V, k_pos, capacity, head_dim, keep, kept, max_kept, sk, sv, sp);
  KVTP_CUDA_LAUNCHED();
  scatterRows<<<grid, threads>>>(K, V, k_pos, capacity, head_dim, kept, max_kept, sk, sv, sp);
  KVTP_CUDA_LAUNCHED();
}

void quantizeAppend(int rows, int kv_heads, const Int8Append& a) {
  if (rows == 0) return;
  quantizeAppendKernel<<<dim3(rows, kv_heads, 2), 32>>>(a);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void dequantizeRows(const Int8Append& a, int kv_heads, int count, T* K, T* V, int* k_pos, int64_t stage_capacity) {
  if (count == 0) return;
  dequantizeKernel<<<dim3(count, kv_heads), std::min(a.head_dim, 128)>>>(a, count, K, V, k_pos, stage_capacity);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
__global__ void readNewRowsKernel(const T* K, const T* V, int64_t capacity, int head_dim, const int* first_slots,
                                  int rows, float* out_k, float* out_v) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t from = (int64_t(h) * capacity + first_slots[h] + t) * head_dim, to = (int64_t(h) * rows + t) * head_dim;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x)
    out_k[to + c] = toFloat(K[from + c]), out_v[to + c] = toFloat(V[from + c]);
}

template <class T>
__global__ void writeRowsKernel(T* K, T* V, int head_dim, const int64_t* at, const float* k, const float* v) {
  const int64_t row = at[blockIdx.x] * head_dim, from = int64_t(blockIdx.x) * head_dim;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x)
    K[row + c] = fromFloat<T>(k[from + c]), V[row + c] = fromFloat<T>(v[from + c]);
}

template <class T>
void readNewRows(const T* K, const T* V, int64_t capacity, int heads, int head_dim, const int* first_slots, int rows,
                 float* out_k, float* out_v) {
  if (rows == 0 || heads == 0) return;
  readNewRowsKernel<<<dim3(rows, heads), std::min(head_dim, 128)>>>(K, V, capacity, head_dim, first_slots, rows, out_k,
                                                                    out_v);
  KVTP_CUDA_LAUNCHED();
}

template <class T>
void writeRows(T* K, T* V, int head_dim, const int64_t* at, int n, const float* k, const float* v) {
  if (n == 0) return;
  writeRowsKernel<<<n, std::min(head_dim, 128)>>>(K, V, head_dim, at, k, v);
  KVTP_CUDA_LAUNCHED();
}

#define KVTP_CACHE_OPS(T)                                                                                           \
  template void readNewRows<T>(const T*, const T*, int64_t, int, int, const int*, int, float*, float*);             \
  template void writeRows<T>(T*, T*, int, const int64_t*, int, const float*, const float*);                         \
  template void compactKV<T>(T*, T*, int*, int64_t, int, int, const int*, const int*, int);                         \
  template void dequantizeRows<T>(const Int8Append&, int, int, T*, T*, int*, int64_t);                              \
  template void kiviAppend<T>(const KiviCache<T>&, int, int, const float*, int64_t, int64_t, int64_t, const int*,   \
                              const int*, bool);                                                                    \
  template void kiviSettle<T>(const KiviCache<T>&, int, int, const T*, const T*, const int*, int64_t, const int*,   \
                              int);                                                                                 \
  template void kiviSettleLayers<T>(const KiviCache<T>*, int, int, int, int);                                      \
  template void kiviRows<T>(const KiviCache<T>&, int, int, T*, T*, int*, int64_t);                                  \
  template void lowRankRows<T>(const Blas&, const LowRankCache<T>&, int, int, const int*, T*, T*);                  \
  template void lowRankSettle<T>(const LowRankCache<T>&, int, int, const T*, const T*, const int*, const int*);
KVTP_CACHE_OPS(float)
KVTP_CACHE_OPS(__half)
KVTP_CACHE_OPS(__nv_bfloat16)
#undef KVTP_CACHE_OPS
template void compactKV<int8_t>(int8_t*, int8_t*, int*, int64_t, int, int, const int*, const int*, int);

}  // namespace kvtp::cuda
