// The decode attention of cuda_ops.h (attention): flash-decoding over each KV head's cached rows
// (fp32/fp16/bf16, int8 codes, KIVI's 2/4-bit codes), the twin of kernels/cpu_ops.cpp's attention,
// checked by tests/cuda_kernels_test.cpp and the engine tests, timed by `kvtp bench`
// (docs/BENCHMARKS.md). Versions:
//   v1: the simplest correct kernels: one block per row (norms, softmax partials), elementwise
//       kernels one thread per element, GEMMs through cuBLAS sgemm; attention one block per
//       (query, head) with all scores in shared memory — 1-2 % of the copy bandwidth at decode
//       on an H100 (32 blocks for 132 SMs, each thread walking a key row: uncoalesced).
//   v2 (attention): flash-decoding — keys split over many blocks, one warp per key row (lanes
//       read consecutive channels: coalesced), online softmax per warp, a second kernel combines
//       the splits. 4.8-24x v1; 26 % of the copy bandwidth at 32k: each query head of a GQA
//       group re-read its KV head's rows.
//   v3 (attention): one block per (KV head, split, query) scores every query head of the group
//       against each K/V row it reads once; the split count adapts so short caches still fill
//       the GPU. No faster than v2: the compiler's report showed 128-576-byte stack frames —
//       the per-lane arrays, indexed up to a run-time head_dim / 32, lived in local memory.
//   v4 (attention): the group size G and channels per lane P are template parameters, so every
//       array index is a compile-time constant and the arrays stay in registers. The cache's
//       element type (float, fp16, bf16) is a template parameter too, converted in registers.
//   v5 (attention): each warp requests U = 4 (2 for groups of 4+ query heads) key/value rows
//       before using the first, each lane its P channels in one 4-16-byte load: a warp waited out
//       one load per key before (Little's law: ~2 MB in flight, 2.4 TB/s). Llama-2-7B fp16 decode
//       at 32k on an H200: 12.1 -> 8.8 ms per token; Llama-2-70B shape (8 layers): 5.65 -> 5.23.
//   v6 (attention): the last block of each (query, heads) to finish combines the splits (an
//       atomic counter), the splits' weights found in parallel: no combining kernel. Part of the
//       fused decode layer (docs/BENCHMARKS.md): H100 7B decode at 2k 6.25 -> 5.81 ms together.
//       Asked for, it also leaves each query head's probabilities (the splits write their logits,
//       the combining block their softmax's max and sum, a kernel of its own the probabilities
//       summed per KV head) for the per-step eviction policies.
//   v7 (attention over an int8 cache): codes stay packed in registers until used, steps loaded
//       with them, twice the rows in flight; this step's rows read at full precision from the
//       projection. H100 7B decode at 32k: 47 ms (first form: codes converted on load, a branch
//       per row for the new one) -> 15.3 (rows' loads before any use) -> 9.9 (packed; 10.3 with
//       the fp16 kernel's row count); the fp16 cache: 11.1 ms. Tried: __launch_bounds__ for 4
//       blocks an SM (64 registers, small spills) — 10.3 ms, slower.
//   v8 (attention over a KIVI cache): packed 2/4-bit codes, a coded key scored as q.lo +
//       (q x step).code with its run's pairs in registers, then the ring's full-precision rows.
//       H100 7B decode at 32k, 4 bits: 51.4 ms (index math per channel) -> 23.3 -> 16.7; bound by
//       the per-row reduction and softmax update, not bytes (docs/BENCHMARKS.md).
//   v9 (KIVI): the coded rows by sub-warps (C = 16 / G channels a lane, so 4 rows at once a warp
//       for a group of one), each with its own softmax state, merged within the warp before the
//       ring's rows, each sub-warp a contiguous range of rows. H100 7B decode at 32k, 4 / 2 bits:
//       16.7 / 16.7 ms -> 13.4 / 17.6 (130 registers: one block an SM) -> 10.8 / 12.8 with two
//       blocks an SM; whole runs round-robin over the sub-warps instead: 22.0, reverted.
//   v10 (attention, with the decode GEMVs and norms): launched dependent (launchDependent): its
//       blocks are scheduled while the Q|K|V product finishes and wait for it in-kernel, and it
//       lets the O product start early in turn. H100 7B decode at 2k: 5.64 -> 5.49 ms, the GEMVs'
//       early weight loads included. Tried: the waiting blocks asking L2 for their K/V rows
//       (prefetch.global.L2) — 5.54 ms at 2k, 12.8 instead of 10.8 at 32k — dropped. The
//       full-precision instantiations for groups of 4+ held to two blocks an SM again
//       (kTwoBlocksAnSM): H200 70B-shape decode at 8k 4.54 -> 4.28 ms.
//   v11 (KIVI): the bits a template parameter; a code becomes a float by masking its field into
//       the mantissa of 2^23 and subtracting 2^23 (two full-rate instructions where a 64-bit shift,
//       a mask and a quarter-rate int-to-float conversion were), the field's place in its half-word
//       folded into the run's q x step and the accumulators' final scale; the value's low summed
//       once a row (w lo), not per channel; one softmax rescale for a sub-warp's U rows; blocks in
//       one wave. H100 7B decode at 32k, 4 / 2 bits: 11.46 / 11.60 -> 10.49 / 10.21 ms (batch 8,
//       4 bits: 50.5 -> 42.1), then 10.12 at 4 bits in one wave. Still latency-bound (56 % of its
//       floor): a sub-warp loads its U rows, then computes them, with nothing in flight meanwhile.
//   v12 (KIVI, fp16/bf16 caches): two codes an instruction - a field masked into the mantissa of
//       fp16 1024 is 1024 + code x 2^o, one fused multiply-add gives the code exactly (codePair)
//       - and a key's dot and U rows' values summed in half2 before the float accumulators. Counted
//       per row the attention was instruction-bound (~130 a lane a row). H100 7B decode at 32k,
//       4 bits: 9.70 -> 8.90 ms (58 -> 63 % of its floor); fp32 caches keep the float path.
//   v13 (KIVI): the coded rows' bytes reach shared memory a batch ahead (cp.async, KiviStage), so
//       a batch's loads fly while the one before is computed instead of holding registers: ncu on
//       v12 (H100, 32k, 4 bits) showed 4 warps a scheduler (128 registers) issuing every 2.1
//       cycles, 42 % of the gaps waits on these loads. H100 7B decode at 32k, 4 / 2 bits: 8.86 /
//       8.20 -> 8.27 / 7.99 ms (63.6 -> 68.2 % of the floor at 4 bits); Scissorhands 0.2 +
//       KIVI 4: 7.08 -> 7.05 (its sub-warps' ranges are short, and a new run's key pairs are
//       still a dependent load).
//   v14 (KIVI): the (lo, step) pairs held in the cache's type (cuda::AffinePair: 4 bytes an fp16
//       pair, not 8), a run's key pairs read 16 bytes at a time: a KIVI 4 row with its share of
//       pairs is 160 bytes, not 192. H100 7B decode at 32k, 4 bits: 8.22 -> 7.81 ms (68.6 ->
//       72.1 % of the floor); Scissorhands 0.2 + KIVI 4: 7.06 -> 6.93. Tried since, not kept: a
//       walk tile by tile with each tile's runs' q x step in shared memory (no faster), and a
//       layer's blocks shared among its heads by their rows (0.7 % slower: under a shared budget a
//       layer's longest head is only ~1.14x its mean at 32k) — docs/BENCHMARKS.md. And for the
//       full-precision walk: 16-bit rows held as loaded until used, twice the rows in flight a
//       warp (fp16 at 2k rows a head 13.2 -> 16.2 us: its rows were not latency-bound).
#include <algorithm>
#include <cfloat>
#include <string>
#include <type_traits>

#include "kernels/cuda/cache_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/forward_ops.h"
#include "kernels/cuda/kivi_attention.cuh"

namespace kvtp::cuda {
namespace {

// A lane's P consecutive channels of a cache row as floats, in one load where they span 4, 8 or
// 16 bytes (rows are 16-byte aligned: head_dim x element size is a multiple of 16); zeros when !in.
template <int P, class KT>
__device__ void loadChannels(const KT* row, int lane, bool in, float (&out)[P]) {
  constexpr int bytes = P * int(sizeof(KT));
  KT e[P];
  if (!in) {
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = 0.0f;
    return;
  }
  if constexpr (bytes == 16) *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(row + lane * P);
  else if constexpr (bytes == 8) *reinterpret_cast<uint2*>(e) = *reinterpret_cast<const uint2*>(row + lane * P);
  else if constexpr (bytes == 4) *reinterpret_cast<uint32_t*>(e) = *reinterpret_cast<const uint32_t*>(row + lane * P);
  else {
#pragma unroll
    for (int i = 0; i < P; ++i) e[i] = row[lane * P + i];
  }
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] = toFloat(e[i]);
}

// A lane's P consecutive int8 codes of a cache row, kept packed (P bytes in (P + 3) / 4 words)
// until each is used: registers for twice the rows in flight.
template <int P>
struct Codes {
  uint32_t w[(P + 3) / 4];
  __device__ float at(int i) const { return float(int8_t(w[i / 4] >> (8 * (i % 4)))); }
};
template <int P>
__device__ void loadCodes(const int8_t* row, int lane, bool in, Codes<P>& out) {
  const int8_t* c = row + lane * P;
  if (!in) {
#pragma unroll
    for (auto& w : out.w) w = 0;
  } else if constexpr (P == 8) {
    *reinterpret_cast<uint2*>(out.w) = *reinterpret_cast<const uint2*>(c);
  } else if constexpr (P == 4) {
    out.w[0] = *reinterpret_cast<const uint32_t*>(c);
  } else if constexpr (P == 2) {
    out.w[0] = *reinterpret_cast<const uint16_t*>(c);
  } else {
    out.w[0] = uint8_t(c[0]);
  }
}

// Key row scores `dot` into G heads' online softmax (running max m, sum) and the row's values into
// their N accumulated channels (value(i): channel i of this lane's).
template <int G, int N, class Value>
__device__ void softmaxUpdate(const float (&dot)[G], float (&m)[G], float (&sum)[G], float (&acc)[G][N], Value value) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float m_new = fmaxf(m[g], dot[g]), corr = expf(m[g] - m_new), w = expf(dot[g] - m_new);
    sum[g] = sum[g] * corr + w;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[g][i] = acc[g][i] * corr + w * value(i);
    m[g] = m_new;
  }
}

// The instantiations held to two blocks an SM (128 registers): KIVI's (v9: its sub-warps' state
// took 130, one block an SM, which left its loads' latency exposed — ncu: 12.5 % of warps active),
// and the full-precision caches' at groups of 4+ query heads, whose registers grew past 128 with KIVI's template
// parameters (176 at G = 8, fp16: one block an SM, the Llama-2-70B shape's decode at 8k 6 % and
// at 32k 12-14 % slower; capped, no spills). int8's stay uncapped (capping them spills).
template <int G, class KT, class OT>
constexpr bool kTwoBlocksAnSM = std::is_same_v<KT, uint8_t> || (std::is_same_v<KT, OT> && G >= 4);

// Attention v3. Grid (kv_heads, splits, T): a block takes keys [split * chunk, +chunk) of one KV
// head for one query and all G = heads / kv_heads query heads that read it. Each warp takes every
// kWarps-th key; its lanes hold channels lane P .. lane P + P - 1 (P = head_dim / 32, head_dim <=
// 256) of the G queries and accumulators, so a K/V row is read once per block for G heads. Writes each head's
// unnormalised output with its running max and sum; the last block of a head merges the splits.
constexpr int kMaxSplits = 1024;

// Heads narrower than a warp (head_dim 8, 16) leave the upper lanes idle.
// query heads per KV head, head_dim, cache and output types, a KIVI cache's bits (0 for others)
template <int G, int HD, class KT, class OT, int B>
// A block takes G consecutive query heads of one KV head: `group` (heads / kv_heads) is a multiple
// of G, so a group of 3 or 6 runs as 3 blocks of 1 or 2 heads over the same KV rows. The last
// block of a (query, heads) to finish combines the splits (no combining kernel: its launch and
// single-wave latency cost more than the work); `done` counts finished splits and is left at 0.
// Some instantiations are held to two blocks an SM (kTwoBlocksAnSM).
__global__ void __launch_bounds__(32 * kWarps, kTwoBlocksAnSM<G, KT, OT> ? 2 : 1) attentionSplit(const float* q, int q_stride, const int* q_pos, int heads, int group, const KT* K,
                               const KT* V, const int* k_pos, int L, const int* lengths, int64_t pos_stride,
                               int64_t head_stride, float scale, int splits, float* part_o, float* part_ms,
                               unsigned* done, OT* out, float* probs, Int8Rows q8, bool rows_are_sequences,
                               KiviCache<OT> kc) {
  constexpr int hd = HD, P = (HD + 31) / 32;  // channels per lane: lane * P .. lane * P + P - 1
  letNextStart();
  const bool lane_in = HD >= 32 || int(threadIdx.x % 32) < HD;
  const int h0 = blockIdx.x * G, split = blockIdx.y, t = blockIdx.z;
  // The KV head: its index in the row's sequence (the projection's), and in the cache — a batch's
  // row t reads sequence t's heads, which follow the earlier sequences'.
  const int kv_local = h0 / group, kvh = rows_are_sequences ? t * (heads / group) + kv_local : kv_local;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const KT* Kh = K + kvh * head_stride;
  const KT* Vh = V + kvh * head_stride;
  const int* pos = k_pos + kvh * pos_stride;
  const int row_stride = L;  // of probs
  waitForPrevious();
  if (lengths) L = lengths[kvh];
  constexpr bool int8 = std::is_same_v<KT, int8_t>;
  const int fresh_from = int8 ? q8.fresh_from[kvh] : 0;
  // Each head's keys in `splits` equal parts, sized here from its own length: the launch does not
  // depend on how many keys there are (a decode step replays as a CUDA graph).
  const int chunk = (L + splits - 1) / splits;
  // This lane's query channels (scaled) and accumulators; KIVI loads the query only for the ring's
  // rows, after its coded rows (registers).
  float qr[G][P], acc[G][P], m[G], sum[G];
  auto loadQuery = [&] {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float* qv = q + int64_t(t) * q_stride + int64_t(h0 + g) * hd;
#pragma unroll
      for (int i = 0; i < P; ++i) qr[g][i] = lane_in ? qv[lane * P + i] * scale : 0.0f;
    }
  };
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < P; ++i) acc[g][i] = 0.0f;
    m[g] = -FLT_MAX;
    sum[g] = 0.0f;
  }
  if constexpr (!std::is_same_v<KT, uint8_t>) loadQuery();
  const int p = q_pos[t];
  const int end = min(L, (split + 1) * chunk);
  // Key row l's scores (already reduced over the warp) into the G heads' online softmax, its
  // value channels (value(i): channel i of this lane's) into their accumulators.
  auto accumulate = [&](int l, const float (&dot)[G], auto value) {
    if (probs && lane == 0) {  // the logits, made probabilities by probabilitiesKernel
#pragma unroll
      for (int g = 0; g < G; ++g) probs[(int64_t(t) * heads + h0 + g) * row_stride + l] = dot[g];
    }
    softmaxUpdate(dot, m, sum, acc, value);
  };
  auto scores = [&](auto key, float (&dot)[G]) {  // key(i): channel i of this lane's
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < P; ++i) d += qr[g][i] * key(i);
      dot[g] = warpSum(d);
    }
  };
  // U keys a warp at a time: their rows are all requested before the first is used, so each warp
  // keeps U row loads in flight instead of waiting out one load per key. Fewer for big groups
  // (their registers hold G queries); int8 rows stay packed codes until used, so twice as many.
  constexpr int U = (G >= 4 ? 2 : 4) * (int8 ? 2 : 1);
  // Rows [from, to) of this warp's share, U at a time; load(l, in, key, value) fills a row's P
  // channels of this lane as floats (zeros unless `in`).
  auto walk = [&](int from, int to, auto load) {
    for (int l0 = from + warp; l0 < to; l0 += U * kWarps) {
      float kv[U][P], vv[U][P];
      bool seen[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        // The rows are loaded by the bound alone, with their positions rather than after them (one
        // latency a batch, not two); a row no query sees is read and not accumulated.
        const int l = l0 + u * kWarps;
        seen[u] = l < to && pos[l] <= p;  // the same for the whole warp
        load(l, l < to && lane_in, kv[u], vv[u]);
      }
      float dot[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) scores([&](int i) { return kv[u][i]; }, dot[u]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (seen[u]) accumulate(l0 + u * kWarps, dot[u], [&](int i) { return vv[u][i]; });
    }
  };
  if constexpr (std::is_same_v<KT, uint8_t>) {
    // KIVI: the codes (kivi_attention.cuh), then the ring's full-precision rows. The coded rows go
    // to sub-warps of S lanes, C channels a lane (R = 32 / S rows at once a warp), each with its own
    // softmax state, so a row's reduction takes log2 S shuffles and its softmax update is shared by
    // R rows per instruction (a whole warp per row of a few bytes a lane spent its time there:
    // docs/BENCHMARKS.md); the warp's states merge before the ring's rows.
    constexpr int C = kiviLaneChannels<G, HD>();
    const bool one_pair = kc.group % C == 0;  // each lane's channels share one value group
    const KiviRows<OT> rows{kc, kvh, pos, q + int64_t(t) * q_stride + int64_t(h0) * hd, scale, p,
                            probs ? probs + (int64_t(t) * heads + h0) * row_stride : nullptr, row_stride};
    const int quantized = kc.quantized[kvh], from = split * chunk, coded_end = min(end, quantized);
    extern __shared__ __align__(16) unsigned char kivi_smem[];
    KiviSubWarp<G, C> coded;
    kiviRowsByRanges<G, HD, B>(rows, from, coded_end, coded, kivi_smem);
    kiviToWarp<B, kiviHalfCodes<C, B, OT>(), hd / C>(coded, one_pair, lane_in, m, sum, acc);
    loadQuery();
    walk(max(split * chunk, quantized), end, [&](int l, bool in, float (&k)[P], float (&v)[P]) {
      const int64_t row = kc.ring.at(kvh, l);
      loadChannels<P>(kc.ring.k + row, lane, in, k);
      loadChannels<P>(kc.ring.v + row, lane, in, v);
    });
  } else if constexpr (!int8) {
    walk(split * chunk, end, [&](int l, bool in, float (&k)[P], float (&v)[P]) {
      loadChannels<P>(Kh + int64_t(l) * hd, lane, in, k);
      loadChannels<P>(Vh + int64_t(l) * hd, lane, in, v);
    });
  } else {
    // The cached rows: codes x step (the CPU's dequantized float, exactly).
    const int cached_end = min(end, fresh_from);
    for (int l0 = split * chunk + warp; l0 < cached_end; l0 += U * kWarps) {
      Codes<P> kc[U], vc[U];
      float ks[U], vs[U];
      bool seen[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int l = l0 + u * kWarps;
        const bool in = l < cached_end;  // loads by the bound alone, as walk's
        seen[u] = in && pos[l] <= p;
        loadCodes(Kh + int64_t(l) * hd, lane, in && lane_in, kc[u]);
        loadCodes(Vh + int64_t(l) * hd, lane, in && lane_in, vc[u]);
        ks[u] = in ? q8.k_step[kvh * pos_stride + l] : 0.0f;
        vs[u] = in ? q8.v_step[kvh * pos_stride + l] : 0.0f;
      }
      float dot[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) scores([&](int i) { return kc[u].at(i) * ks[u]; }, dot[u]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (seen[u]) accumulate(l0 + u * kWarps, dot[u], [&](int i) { return vc[u].at(i) * vs[u]; });
    }
    // This step's rows (each head's last, so in its last split): full precision, from the projection.
    for (int l = max(split * chunk, fresh_from) + warp; l < end; l += kWarps) {
      if (pos[l] > p) continue;
      float kv[P], vv[P], dot[G];
      const int64_t row = (rows_are_sequences ? t : l - fresh_from) * q8.fresh_stride + kv_local * hd;
      loadChannels<P>(q8.fresh_k + row, lane, lane_in, kv);
      loadChannels<P>(q8.fresh_v + row, lane, lane_in, vv);
      scores([&](int i) { return kv[i]; }, dot);
      accumulate(l, dot, [&](int i) { return vv[i]; });
    }
  }
  // Merge the block's warps through shared memory, one query head at a time.
  __shared__ float s_m[kWarps], s_sum[kWarps], s_acc[kWarps][256];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    __syncthreads();
    if (lane == 0) s_m[warp] = m[g], s_sum[warp] = sum[g];
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (lane_in) s_acc[warp][lane * P + i] = acc[g][i];
    __syncthreads();
    float M = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w]);
    const int64_t slot = (int64_t(t) * heads + h0 + g) * splits + split;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float o = 0.0f;
      for (int w = 0; w < kWarps; ++w)
        if (s_m[w] != -FLT_MAX) o += s_acc[w][d] * expf(s_m[w] - M);
      part_o[slot * hd + d] = o;
    }
    if (threadIdx.x == 0) {
      float S = 0.0f;
      for (int w = 0; w < kWarps; ++w)
        if (s_m[w] != -FLT_MAX) S += s_sum[w] * expf(s_m[w] - M);
      part_ms[slot * 2] = M;
      part_ms[slot * 2 + 1] = S;
    }
  }
  // Publish this split's partials, then count it; the block that counts last sees every split's.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  unsigned* counter = done + int64_t(t) * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == unsigned(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // out = sum_j o_j e^(m_j - M) / sum_j s_j e^(m_j - M) per head, the splits' weights found in
  // parallel (a thread looping over the splits waited out one L2 read after another). __ldcg
  // reads L2, where the other blocks' partials are (L1 is not coherent).
  __shared__ float weight[kMaxSplits];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t base = (int64_t(t) * heads + h0 + g) * splits;
    float M = -FLT_MAX;
    for (int j = threadIdx.x; j < splits; j += blockDim.x) M = fmaxf(M, __ldcg(part_ms + (base + j) * 2));
    M = blockReduce(M, warpMax, -FLT_MAX);
    float S = 0.0f;
    for (int j = threadIdx.x; j < splits; j += blockDim.x) {
      const float mj = __ldcg(part_ms + (base + j) * 2);
      weight[j] = mj == -FLT_MAX ? 0.0f : expf(mj - M);
      S += __ldcg(part_ms + (base + j) * 2 + 1) * weight[j];
    }
    const float inv_sum = 1.0f / fmaxf(blockReduce(S, warpSum, 0.0f), FLT_MIN);  // its barriers publish weight[]
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float o = 0.0f;
#pragma unroll 8
      for (int j = 0; j < splits; ++j) o += __ldcg(part_o + (base + j) * hd + d) * weight[j];
      out[(int64_t(t) * heads + h0 + g) * hd + d] = fromFloat<OT>(o * inv_sum);
    }
    if (probs && threadIdx.x == 0) {  // the softmax's max and 1 / sum, for probabilitiesKernel
      float* ms = probs + int64_t(gridDim.z) * heads * row_stride + (int64_t(t) * heads + h0 + g) * 2;
      ms[0] = M, ms[1] = inv_sum;
    }
    __syncthreads();  // weight[] is the next head's
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch (a replayed graph's too)
}

// weights[t][g][l] = the probability e^(logit - M) / sum of key l summed over KV head g's query
// heads, for the keys query t sees (0 for the others), l below the head's length; logits as the
// split blocks left them, (M, 1 / sum) per (t, head) after them. A kernel of its own rather than
// the combining block's tail, which walked a whole head's keys in one block while the layer
// waited. In a batch (rows_are_sequences) row t's heads are sequence t's.
__global__ void probabilitiesKernel(const float* probs, int heads, int group, int L, const int* lengths,
                                    bool rows_are_sequences, const int* k_pos, int64_t pos_stride, const int* q_pos,
                                    float* weights) {
  const int g = blockIdx.y, t = blockIdx.z, l = blockIdx.x * blockDim.x + threadIdx.x;
  const int kvh = rows_are_sequences ? t * gridDim.y + g : g;
  if (l >= (lengths ? lengths[kvh] : L)) return;
  const float* ms = probs + int64_t(gridDim.z) * heads * L;
  float s = 0.0f;
  if (k_pos[kvh * pos_stride + l] <= q_pos[t])
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const int64_t row = int64_t(t) * heads + h;
      s += expf(probs[row * L + l] - ms[row * 2]) * ms[row * 2 + 1];
    }
  weights[(int64_t(t) * gridDim.y + g) * L + l] = s;
}

}  // namespace

template <class KT, class OT>
void attention(const float* q, int q_stride, const int* q_pos, int T, int heads, const KT* K, const KT* V,
               const int* k_pos, int L, int kv_heads, int head_dim, int64_t head_stride, float scale, OT* out,
               const int* lengths, int64_t pos_stride, float* weights, const Int8Rows* int8, bool rows_are_sequences,
               const KiviCache<OT>* kivi) {
  if (heads % kv_heads != 0) throw std::runtime_error("cuda::attention: heads must be a multiple of kv_heads");
  const int group = heads / kv_heads;
  const int G = group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;  // query heads per block
  if (L == 0 || T == 0) return;
  // Enough blocks to fill the GPU (about 4 per SM) but at least 32 keys each.
  // L bounds every head's length (with `lengths`, the kernel reads each head's own), so the split
  // count depends on the bound only: a caller passing its capacity gets the same launch every step.
  // KIVI's blocks, two an SM at most (kTwoBlocksAnSM), in one wave: its blocks' fixed costs (runs'
  // pairs, merges) are a larger share than the full-precision caches' (H100 7B decode at 32k:
  // 10.50 -> 10.12 ms; Scissorhands 0.2 + KIVI 4: 9.20 -> 9.01).
  const int per_sm = std::is_same_v<KT, uint8_t> ? 2 : 4;
  const int want = std::max(1, per_sm * multiprocessors() / std::max(1, (heads / G) * T));
  const int splits = std::clamp((L + 31) / 32, 1, std::min(want, kMaxSplits));
  // Partials live in a grow-only scratch buffer: steady-state decode allocates nothing.
  static thread_local DeviceBuffer<float> scratch;
  float* part_o = grow(scratch, size_t(T) * heads * splits * (head_dim + 2));
  float* part_ms = part_o + size_t(T) * heads * splits * head_dim;
  const dim3 grid(heads / G, splits, T);
  static thread_local DeviceBuffer<float> head_probs;  // (T, heads, L) logits, then (T, heads) x (M, 1 / sum)
  float* probs = weights ? grow(head_probs, size_t(T) * heads * (L + 2)) : nullptr;
  static thread_local DeviceBuffer<unsigned> counters;  // zero between launches
  if (counters.size() < size_t(grid.x) * T) {
    counters = DeviceBuffer<unsigned>(size_t(grid.x) * T);
    KVTP_CUDA_CHECK(cudaMemset(counters.get(), 0, counters.size() * sizeof(unsigned)));
  }
  const int threads = 32 * kWarps;
  // One instantiation per (group size, channels per lane) in use.
  auto launchBits = [&](auto g, auto p, auto b) {
    constexpr int Gv = decltype(g)::value, HDv = decltype(p)::value, Bv = decltype(b)::value;
    constexpr int smem = kiviStagedBytes<Gv, HDv, Bv, OT>();
    auto* kernel = attentionSplit<Gv, HDv, KT, OT, Bv>;
    if constexpr (smem > 0) {
      static const bool opted_in = [kernel] {  // past the default 48 KB with the static shared memory
        KVTP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        return true;
      }();
      (void)opted_in;
    }
    launchDependent(kernel, grid, threads, size_t(smem), q, q_stride, q_pos, heads, group, K, V, k_pos, L, lengths,
                    pos_stride, head_stride, scale, splits, part_o, part_ms, counters.get(), out, probs,
                    int8 ? *int8 : Int8Rows{}, rows_are_sequences, kivi ? *kivi : KiviCache<OT>{});
  };
  auto launch = [&](auto g, auto p) {
    if constexpr (!std::is_same_v<KT, uint8_t>) return launchBits(g, p, std::integral_constant<int, 0>{});
    else if (kivi->bits == 2) return launchBits(g, p, std::integral_constant<int, 2>{});
    else if (kivi->bits == 4) return launchBits(g, p, std::integral_constant<int, 4>{});
    else throw std::runtime_error("cuda::attention: KIVI keeps 2- or 4-bit codes, not " + std::to_string(kivi->bits));
  };
  auto byWidth = [&](auto g) {
    switch (head_dim) {
      case 8: return launch(g, std::integral_constant<int, 8>{});
      case 16: return launch(g, std::integral_constant<int, 16>{});
      case 32: return launch(g, std::integral_constant<int, 32>{});
      case 64: return launch(g, std::integral_constant<int, 64>{});
      case 128: return launch(g, std::integral_constant<int, 128>{});
      case 256: return launch(g, std::integral_constant<int, 256>{});
      default: throw std::runtime_error("cuda::attention: head_dim " + std::to_string(head_dim) +
                                        " is not one of 8, 16, 32, 64, 128, 256");
    }
  };
  switch (G) {
    case 1: byWidth(std::integral_constant<int, 1>{}); break;
    case 2: byWidth(std::integral_constant<int, 2>{}); break;
    case 4: byWidth(std::integral_constant<int, 4>{}); break;
    case 8: byWidth(std::integral_constant<int, 8>{}); break;
  }
  KVTP_CUDA_LAUNCHED();
  if (weights) {
    probabilitiesKernel<<<dim3((L + 255) / 256, kv_heads, T), 256>>>(probs, heads, group, L, lengths, rows_are_sequences,
                                                                      k_pos, pos_stride, q_pos, weights);
    KVTP_CUDA_LAUNCHED();
  }
}

#define KVTP_ATTENTION(KT, OT)                                                                                 \
  template void attention<KT, OT>(const float*, int, const int*, int, int, const KT*, const KT*, const int*, int, \
                                  int, int, int64_t, float, OT*, const int*, int64_t, float*, const Int8Rows*, bool, \
                                  const KiviCache<OT>*);
KVTP_ATTENTION(float, float)
KVTP_ATTENTION(__half, __half)
KVTP_ATTENTION(__nv_bfloat16, __nv_bfloat16)
KVTP_ATTENTION(int8_t, float)
KVTP_ATTENTION(int8_t, __half)
KVTP_ATTENTION(int8_t, __nv_bfloat16)
KVTP_ATTENTION(uint8_t, float)
KVTP_ATTENTION(uint8_t, __half)
KVTP_ATTENTION(uint8_t, __nv_bfloat16)
#undef KVTP_ATTENTION

}  // namespace kvtp::cuda
