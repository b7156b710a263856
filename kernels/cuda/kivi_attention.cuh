// KIVI's coded rows in the decode attention (decode_attention.cu's attentionSplit): the packed
// codes' decoding and a block's walk over a KV head's coded rows (kiviRowsByRanges: each sub-warp a
// range of its own) into the G query heads' online softmax. Included by decode_attention.cu only;
// its version history is there.
#pragma once
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/device_util.cuh"

namespace kvtp::cuda {
namespace {

constexpr int kWarps = 8;  // a decode attention block's warps

// A lane's codes of a packed row: channels lane * C .. lane * C + C - 1 at `nbits` = C * bits
// bits each lane, low bits first (nbits below 8: within one byte).
__device__ uint64_t lanePacked(const uint8_t* row, int lane, int nbits) {
  const int bit0 = lane * nbits;
  const uint8_t* b = row + bit0 / 8;
  switch (nbits) {
    case 64: return *reinterpret_cast<const uint64_t*>(b);
    case 32: return *reinterpret_cast<const uint32_t*>(b);
    case 16: return *reinterpret_cast<const uint16_t*>(b);
    case 8: return *b;
    default: return uint32_t(*b) >> (bit0 % 8);
  }
}

// A lane's packed codes (lanePacked) as W 32-bit words.
template <int W>
__device__ void laneWords(uint64_t bits, uint32_t (&w)[W]) {
  w[0] = uint32_t(bits);
  if constexpr (W > 1) w[1] = uint32_t(bits >> 32);
}

// Code c of a lane's B-bit codes (low bits first) times 2^codeShift(c): the code's field masked in
// place into the mantissa of 2^23 (its word's upper half shifted down first), 2^23 subtracted —
// exact, and two full-rate instructions where a shift, a mask and an int-to-float conversion (a
// quarter of the rate) were the KIVI attention's bottleneck. Callers fold codeUnshift(c) into a
// factor they already multiply by.
template <int B>
__host__ __device__ constexpr int codeShift(int c) { return c * B % 16; }
template <int B>
__host__ __device__ constexpr float codeShiftScale(int c) { return float(1 << codeShift<B>(c)); }
template <int B>
__host__ __device__ constexpr float codeUnshift(int c) { return 1.0f / codeShiftScale<B>(c); }
template <int B, int W>
__device__ float kiviCode(const uint32_t (&w)[W], int c) {
  const uint32_t word = w[c * B / 32], half = (c * B % 32) >= 16 ? word >> 16 : word;
  return __uint_as_float(0x4B000000u | (half & (((1u << B) - 1) << codeShift<B>(c)))) - 8388608.0f;
}

// Two codes of a lane's B-bit codes in one half2, exact: the fields at bit o of both 16-bit halves
// of word w / 16 * B (after the word moves down a byte for the upper byte's fields), masked into the
// mantissa of fp16 1024, are 1024 + code x 2^o, and (h - 1024) x 2^-o (one fused multiply-add) is the
// code. Pair p holds channels (word k's first + j, + 16 / B), k = p / (16 / B), j = p % (16 / B):
// codePairChannel gives the first.
template <int B>
__host__ __device__ constexpr int codePairChannel(int p) { return p / (16 / B) * (32 / B) + p % (16 / B); }
template <int B, int W>
__device__ __half2 codePair(const uint32_t (&w)[W], int p) {
  constexpr int per_byte = 8 / B;
  const int j = p % (16 / B), o = j % per_byte * B;
  const uint32_t word = j >= per_byte ? w[p / (16 / B)] >> 8 : w[p / (16 / B)];
  const uint32_t mask = ((1u << B) - 1) << o, bits = (word & (mask | mask << 16)) | 0x64006400u;
  const float down = 1.0f / float(1 << o);
  return __hfma2(*reinterpret_cast<const __half2*>(&bits), __float2half2_rn(down), __float2half2_rn(-1024.0f * down));
}


// KIVI's coded rows in attentionSplit: C channels a lane (16 / G, at least a warp's share of the
// head, at most the head), U rows a sub-warp at once.
template <int G, int HD>
__host__ __device__ constexpr int kiviLaneChannels() {
  constexpr int P = (HD + 31) / 32;
  return 16 / G < P ? P : 16 / G > HD ? HD : 16 / G;
}
template <int G>
__host__ __device__ constexpr int kiviRowsAtOnce() { return G >= 4 ? 2 : 4; }

// A stage of KIVI's coded rows in shared memory: each thread's own part of U rows (its words of the
// key's and the value's codes, its value group's (lo, step) pair, the row's position and run), copied a
// batch ahead with cp.async, so that a batch's loads fly while the batch before is computed and
// hold no registers. The staged instantiations are those whose lane holds whole words of codes
// (C x B = 32 or 64 bits: cp.async copies 4, 8 or 16 bytes).
constexpr int kKiviStages = 2;
template <int U, int W, class Pair>
struct KiviStage {
  using Word = std::conditional_t<W == 2, uint2, uint32_t>;
  Word k[U][32 * kWarps], v[U][32 * kWarps];  // [row][thread]
  Pair pair[U][32 * kWarps];
  int pos[U][32 * kWarps], run[U][32 * kWarps];  // (run: under eviction)
};
template <int G, int HD, int B>
__host__ __device__ constexpr bool kiviStaged() {
  return B > 0 && (kiviLaneChannels<G, HD>() * B == 32 || kiviLaneChannels<G, HD>() * B == 64);
}
template <int G, int HD, int B, class T>
constexpr int kiviStagedBytes() {
  if constexpr (!kiviStaged<G, HD, B>()) return 0;
  else return kKiviStages * int(sizeof(KiviStage<kiviRowsAtOnce<G>(), kiviLaneChannels<G, HD>() * B / 32, AffinePair<T>>));
}

// A run's key pairs for a lane's C channels as floats, f(c, pair) each, read 16 bytes at a time
// where their bytes allow (a lane's pairs start on a multiple of their bytes).
template <int C, class T, class F>
__device__ void forKeyPairs(const AffinePair<T>* pairs, F f) {
  constexpr int per = 16 / int(sizeof(AffinePair<T>));
  if constexpr (C % per == 0) {
#pragma unroll
    for (int c0 = 0; c0 < C; c0 += per) {
      const uint4 words = *reinterpret_cast<const uint4*>(pairs + c0);
      const AffinePair<T>* p = reinterpret_cast<const AffinePair<T>*>(&words);
#pragma unroll
      for (int i = 0; i < per; ++i) f(c0 + i, p[i].get());
    }
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) f(c, pairs[c].get());
  }
}


// A sub-warp's online softmax over the coded rows it has seen, for G query heads and its lane's C
// channels: acc_c[g][c] channel c's weighted values (times 2^codeShift(c) on the float path), less
// the lows, which acc_lo sums where one value pair covers the lane.
template <int G, int C>
struct KiviSubWarp {
  float acc_c[G][C], acc_lo[G], m[G], sum[G];
  __device__ KiviSubWarp() {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int c = 0; c < C; ++c) acc_c[g][c] = 0.0f;
      acc_lo[g] = 0.0f, m[g] = -FLT_MAX, sum[g] = 0.0f;
    }
  }
};

// fp16 / bf16 caches whose lanes hold whole words of codes decode two channels an instruction
// (codePair) and sum a key's dot and U rows' values in half2 before the float accumulators: the
// decoding and an FMA per channel and row bounded this attention by instruction issue, and half2
// halves that, adding an error far below the codes' own (half a step a channel). fp32 caches keep
// the float path, the CPU's arithmetic.
template <int C, int B, class OT>
__host__ __device__ constexpr bool kiviHalfCodes() { return !std::is_same_v<OT, float> && (C * B) % 32 == 0; }

// U rows' scores (dot, -FLT_MAX where !seen) into each head's online softmax at once (one rescale
// of the accumulators), their values (codes vw, the lane's value pair where one covers it,
// channel_pair(u, c) a channel's own otherwise) into its accumulators.
template <int B, bool kHalfCodes, int G, int C, int U, int W, class ChannelPair>
__device__ void kiviAccumulate(KiviSubWarp<G, C>& s, const float (&dot)[U][G], const bool (&seen)[U],
                               const float2 (&pair)[U], const uint32_t (&vw)[U][W], bool one_pair,
                               ChannelPair channel_pair) {
  float corr[G], w[G][U];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float m_new = s.m[g];
#pragma unroll
    for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, dot[u][g]);
    corr[g] = __expf(s.m[g] - m_new);
#pragma unroll
    for (int u = 0; u < U; ++u) w[g][u] = seen[u] ? __expf(dot[u][g] - m_new) : 0.0f;
    s.sum[g] *= corr[g];
    s.acc_lo[g] *= corr[g];
#pragma unroll
    for (int u = 0; u < U; ++u) s.sum[g] += w[g][u], s.acc_lo[g] = fmaf(w[g][u], pair[u].x, s.acc_lo[g]);
    s.m[g] = m_new;
  }
  if (kHalfCodes && one_pair) {  // each channel pair's U rows summed in half2 (code x w x step)
    constexpr int Pairs = C / 2;
    __half2 ws[G][U];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int u = 0; u < U; ++u) ws[g][u] = __float2half2_rn(w[g][u] * pair[u].y);
#pragma unroll
    for (int i = 0; i < Pairs; ++i) {
      __half2 a[G];
#pragma unroll
      for (int g = 0; g < G; ++g) a[g] = __float2half2_rn(0.0f);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const __half2 code = codePair<B>(vw[u], i);
#pragma unroll
        for (int g = 0; g < G; ++g) a[g] = __hfma2(code, ws[g][u], a[g]);
      }
      const int c0 = codePairChannel<B>(i), c1 = c0 + 16 / B;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        s.acc_c[g][c0] = fmaf(s.acc_c[g][c0], corr[g], __low2float(a[g]));
        s.acc_c[g][c1] = fmaf(s.acc_c[g][c1], corr[g], __high2float(a[g]));
      }
    }
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int c = 0; c < C; ++c) {
        float a = s.acc_c[g][c] * corr[g];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (one_pair) {
            a = fmaf(w[g][u] * pair[u].y, kiviCode<B>(vw[u], c), a);
          } else if (seen[u]) {  // the channel's own pair, its low scaled as the code is
            const float2 v = channel_pair(u, c);
            a = fmaf(w[g][u], fmaf(v.y, kiviCode<B>(vw[u], c), v.x * codeShiftScale<B>(c)), a);
          }
        }
        s.acc_c[g][c] = a;
      }
  }
}

// The warp's R sub-warp states merged (each sub-warp ends with all of them), then handed to the
// warp's layout (lane i: channels i P .. i P + P - 1) for the ring's rows and the block's merge.
template <int B, bool kHalfCodes, int S, int G, int C, int P>
__device__ void kiviToWarp(KiviSubWarp<G, C>& s, bool one_pair, bool lane_in, float (&m)[G], float (&sum)[G],
                           float (&acc)[G][P]) {
  const int lane = threadIdx.x % 32;
  // acc_c: the half2 path's channels as they are, the float path's times 2^codeShift(c).
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < C; ++c)
      s.acc_c[g][c] = s.acc_lo[g] + s.acc_c[g][c] * (kHalfCodes && one_pair ? 1.0f : codeUnshift<B>(c));
#pragma unroll
  for (int o = S; o < 32; o *= 2)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, s.m[g], o), s_o = __shfl_xor_sync(0xffffffffu, s.sum[g], o);
      const float M = fmaxf(s.m[g], m_o), a = expf(s.m[g] - M), b = expf(m_o - M);
      s.sum[g] = s.sum[g] * a + s_o * b;
#pragma unroll
      for (int c = 0; c < C; ++c)
        s.acc_c[g][c] = s.acc_c[g][c] * a + __shfl_xor_sync(0xffffffffu, s.acc_c[g][c], o) * b;
      s.m[g] = M;
    }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = s.m[g], sum[g] = s.sum[g];
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int ch = lane * P + i;  // held by lane ch / C of the first sub-warp, as its element ch % C
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float x = __shfl_sync(0xffffffffu, s.acc_c[g][c], (ch / C) % 32);
        if (c == ch % C) acc[g][i] = lane_in ? x : 0.0f;
      }
    }
  }
}

// What a block's walk over a KV head's coded rows needs: the cache and the head, its positions,
// the query row's G heads (scaled by `scale` when used), the query's position, and where the rows'
// logits go when asked (head g's at probs[g * probs_stride + l]).
template <class OT>
struct KiviRows {
  const KiviCache<OT>& kc;
  int kvh;
  const int* pos;
  const float* q;  // head g's channel c at q[g * head_dim + c]
  float scale;
  int p;
  float* probs;
  int64_t probs_stride;
};

// Each sub-warp a contiguous range of the rows [from, to), with its own softmax state (v9-v14). A
// key row's scores come from its codes and its run's (lo, step) pairs as q.k = sum q lo + sum
// (q step) code, the current run's q x step kept in registers; a value row adds w lo to a lane's
// sum of lows (its channels share one value group) and w step code to each channel. Staged
// instantiations (kiviStaged) copy a batch's rows to shared memory (`smem`) a batch ahead.
template <int G, int HD, int B, class OT>
__device__ void kiviRowsByRanges(const KiviRows<OT>& r, int from, int to, KiviSubWarp<G, kiviLaneChannels<G, HD>()>& s,
                                 unsigned char* smem) {
  constexpr int hd = HD, C = kiviLaneChannels<G, HD>(), S = hd / C, R = 32 / S, W = (C * B + 31) / 32;
  constexpr int U = kiviRowsAtOnce<G>(), Pairs = C / 2;
  constexpr bool kHalfCodes = kiviHalfCodes<C, B, OT>();
  const KiviCache<OT>& kc = r.kc;
  const int kvh = r.kvh, p = r.p, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cb = kc.codeBytes(), group = kc.group, value_groups = kc.valueGroups(), sub = lane / S, sl = lane % S,
            lane_pair = sl * C / group;
  const int* pos = r.pos;
  const uint8_t* k_codes = kc.K + int64_t(kvh) * kc.capacity * cb;
  const uint8_t* v_codes = kc.V + int64_t(kvh) * kc.capacity * cb;
  using Pair = AffinePair<OT>;
  const Pair* k_params = kc.k_params + int64_t(kvh) * kc.keyGroups() * hd + sl * C;
  const Pair* v_params = kc.v_params + int64_t(kvh) * kc.capacity * value_groups;
  const int* runs = kc.run ? kc.run + int64_t(kvh) * kc.capacity : nullptr;
  const bool one_pair = group % C == 0;  // this lane's channels share one value group
  const float* q_lane = r.q + sl * C;   // + g * hd: head g
  constexpr int subs = kWarps * R;
  const int per = max(0, (to - from + subs - 1) / subs), lo = from + (warp * R + sub) * per, hi = min(to, lo + per);
  // The current run's q x step x 2^-codeShift per channel and this lane's q . lo; without
  // eviction a run is `group` consecutive rows (run_end: the next one's first row).
  float q_step[G][C] = {}, q_lo[G] = {};
  __half2 q_step2[kHalfCodes ? G : 1][kHalfCodes ? Pairs : 1];  // kHalfCodes: q_step by codePair's pairs
  int current_run = -1, run_end = 0;  // a sub-warp's rows ascend, and so do their runs
  // Staged (kiviStaged): this thread's part of rows lo + k .. lo + k + U - 1 on its way to stage
  // (k / U) % kKiviStages (none past the sub-warp's rows: an empty group, so each batch waits
  // for one).
  constexpr bool kStaged = kiviStaged<G, HD, B>();
  using Stage = KiviStage<U, W, Pair>;
  using Word = typename Stage::Word;
  Stage* stages = reinterpret_cast<Stage*>(smem);
  const int tid = threadIdx.x;
  auto stageRows = [&](int k) {
    if (k < per) {
      Stage& st = stages[(k / U) % kKiviStages];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int l = lo + k + u;
        const bool in = l < hi;
        const int64_t row = in ? l : 0;  // (an address in the head either way)
        copyAsync<sizeof(Word)>(&st.k[u][tid], k_codes + row * cb + sl * sizeof(Word), in);
        copyAsync<sizeof(Word)>(&st.v[u][tid], v_codes + row * cb + sl * sizeof(Word), in);
        if (one_pair) copyAsync<sizeof(Pair)>(&st.pair[u][tid], v_params + row * value_groups + lane_pair, in);
        copyAsync<4>(&st.pos[u][tid], pos + row, in);
        if (runs) copyAsync<4>(&st.run[u][tid], runs + row, in);
      }
    }
    commitCopies();
  };
  if constexpr (kStaged) stageRows(0);
  for (int k = 0; k < per; k += U) {  // the same trip count for the whole warp (its shuffles)
    uint32_t kw[U][W], vw[U][W];
    float2 pair[U];
    bool seen[U];
    int run[U];
    if constexpr (kStaged) {
      stageRows(k + U);  // the next batch's copies fly while this one is computed
      waitCopies<1>();   // this batch's have landed (a thread reads only its own copies)
      const Stage& st = stages[(k / U) % kKiviStages];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = lo + k + u < hi;
        seen[u] = in && st.pos[u][tid] <= p;
        run[u] = in && runs ? st.run[u][tid] : 0;
        const Word kword = st.k[u][tid], vword = st.v[u][tid];
        if constexpr (W == 2) kw[u][0] = kword.x, kw[u][1] = kword.y, vw[u][0] = vword.x, vw[u][1] = vword.y;
        else kw[u][0] = kword, vw[u][0] = vword;
        pair[u] = in && one_pair ? st.pair[u][tid].get() : float2{0.0f, 0.0f};
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        // Every load waits on the bound alone, not on the row's position: all of them are in
        // flight at once (a hole's or a future row's bytes are read and then masked out).
        const int l = lo + k + u;
        const bool in = l < hi;
        seen[u] = in && pos[l] <= p;
        run[u] = in && runs ? runs[l] : 0;
        laneWords<W>(in ? lanePacked(k_codes + int64_t(l) * cb, sl, C * B) : 0u, kw[u]);
        laneWords<W>(in ? lanePacked(v_codes + int64_t(l) * cb, sl, C * B) : 0u, vw[u]);
        pair[u] = in && one_pair ? v_params[int64_t(l) * value_groups + lane_pair].get() : float2{0.0f, 0.0f};
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (!seen[u]) pair[u] = float2{0.0f, 0.0f};  // a hole's pair may be anything: w = 0 must stay 0
    float dot[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int l = lo + k + u;
      if (seen[u] && (runs ? run[u] != current_run : l >= run_end)) {  // a new run: its key pairs
        current_run = runs ? run[u] : l / group;
        run_end = (current_run + 1) * group;
#pragma unroll
        for (int g = 0; g < G; ++g) q_lo[g] = 0.0f;
        forKeyPairs<C>(k_params + int64_t(current_run) * hd, [&](int c, float2 a) {
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float qc = q_lane[g * hd + c] * r.scale;
            q_step[g][c] = qc * a.y * (kHalfCodes ? 1.0f : codeUnshift<B>(c)), q_lo[g] += qc * a.x;
          }
        });
        if constexpr (kHalfCodes)
#pragma unroll
          for (int g = 0; g < G; ++g)
#pragma unroll
            for (int i = 0; i < Pairs; ++i)
              q_step2[g][i] = __floats2half2_rn(q_step[g][codePairChannel<B>(i)],
                                                q_step[g][codePairChannel<B>(i) + 16 / B]);
      }
      float d[G];
      if constexpr (kHalfCodes) {
        __half2 code[Pairs], d2[G];
#pragma unroll
        for (int i = 0; i < Pairs; ++i) code[i] = codePair<B>(kw[u], i);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          d2[g] = __float2half2_rn(0.0f);
#pragma unroll
          for (int i = 0; i < Pairs; ++i) d2[g] = __hfma2(code[i], q_step2[g][i], d2[g]);
          d[g] = q_lo[g] + (__low2float(d2[g]) + __high2float(d2[g]));
        }
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          d[g] = q_lo[g];
#pragma unroll
          for (int c = 0; c < C; ++c) d[g] = fmaf(q_step[g][c], kiviCode<B>(kw[u], c), d[g]);
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int o = S / 2; o > 0; o /= 2) d[g] += __shfl_xor_sync(0xffffffffu, d[g], o);
        dot[u][g] = seen[u] ? d[g] : -FLT_MAX;
      }
      if (r.probs && sl == 0 && seen[u]) {
#pragma unroll
        for (int g = 0; g < G; ++g) r.probs[g * r.probs_stride + l] = dot[u][g];
      }
    }
    kiviAccumulate<B, kHalfCodes>(s, dot, seen, pair, vw, one_pair, [&](int u, int c) {
      return v_params[int64_t(lo + k + u) * value_groups + (sl * C + c) / group].get();
    });
  }
  if constexpr (kStaged) waitCopies<0>();  // (the empty last group)
}

}  // namespace
}  // namespace kvtp::cuda
