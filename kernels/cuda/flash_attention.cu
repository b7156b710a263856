// Causal prefill attention on tensor cores (forward_ops.h, flashAttention), FlashAttention-2's
// scheme: a block holds 64 query rows of one head (16 per warp) and walks the keys in tiles of
// 64; each warp computes its 16 x 64 scores with mma.sync (m16n8k16, fp16/bf16 in, float32
// accumulation), applies the position mask and the online softmax in registers, and multiplies
// the probabilities, kept as the A operand without leaving registers, by the value tile; the
// next key/value tile is copied to shared memory (cp.async) while this one is used. Scores
// never reach memory: the materialised path (score GEMMs, a softmax kernel, a PV GEMM) moved
// about 1 GB per layer at 2048 tokens for a 7B shape.
// Fragment layouts are the PTX ISA's for mma.m16n8k16 (lane = 4 g + t): A holds rows g and g + 8,
// columns 2t, 2t + 1 (+8); B columns g, rows 2t, 2t + 1 (+8); C rows g and g + 8, columns 2t, 2t + 1.
#include <cfloat>
#include <climits>
#include <type_traits>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/forward_ops.h"

namespace kvtp::cuda {
namespace {

constexpr int kRows = 64, kKeys = 64, kWarps = kRows / 16;

template <class T>
__device__ uint32_t pack(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// c += a (16 x 16) . b (16 x 8).
template <class T>
__device__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 tiles of 16-bit values from shared memory, transposed: lanes 8i..8i+7 address the
// rows of tile i; the result is the B operand of two m16n8k16 products.
__device__ void loadTransposed(const void* row, uint32_t (&b)[4]) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr));
}

// Shared memory of a block: two stages of K and V tiles (the next tile loads while this one is
// used), rows padded by 8 elements so that the 8 rows a fragment load touches fall on different banks.
template <class T, int HD>
constexpr int flashSharedBytes() {
  return 2 * 2 * kKeys * (HD + 8) * int(sizeof(T));
}

// Grid (query blocks, heads), 128 threads.
template <class T, int HD>
__global__ void __launch_bounds__(32 * kWarps) flashKernel(const float* q, int64_t q_stride, const int* q_pos,
                                                           int rows, int group, const T* K, const T* V,
                                                           const int* k_pos, int L, int64_t capacity, float scale,
                                                           T* out) {
  constexpr int LD = HD + 8, KB = HD / 16, NT = HD / 8, kTile = kKeys * LD;
  extern __shared__ __align__(16) unsigned char shared[];
  T* const tiles = reinterpret_cast<T*>(shared);  // stage s: K at tiles + 2 s kTile, V after it
  __shared__ int key_count;
  const int heads = gridDim.y, h = blockIdx.y;
  const T* Kh = K + int64_t(h / group) * capacity * HD;
  const T* Vh = V + int64_t(h / group) * capacity * HD;
  // The last query blocks see the most keys: start them first.
  const int row0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  if (threadIdx.x == 0) {  // keys at positions up to the block's last query (k_pos ascending)
    int p = INT_MIN;
    for (int r = row0; r < min(rows, row0 + kRows); ++r) p = max(p, q_pos[r]);
    int lo = 0, hi = L;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (k_pos[mid] <= p) lo = mid + 1;
      else hi = mid;
    }
    key_count = lo;
  }
  // This thread's two query rows, their positions and Q fragments (scaled, rounded to T).
  const int ra = row0 + warp * 16 + g, rb = ra + 8;
  const int pa = ra < rows ? q_pos[ra] : INT_MIN, pb = rb < rows ? q_pos[rb] : INT_MIN;
  uint32_t qf[KB][4];
  auto qAt = [&](int r, int c) { return r < rows ? q[int64_t(r) * q_stride + int64_t(h) * HD + c] * scale : 0.0f; };
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
    const int c = kb * 16 + 2 * t;
    qf[kb][0] = pack<T>(qAt(ra, c), qAt(ra, c + 1));
    qf[kb][1] = pack<T>(qAt(rb, c), qAt(rb, c + 1));
    qf[kb][2] = pack<T>(qAt(ra, c + 8), qAt(ra, c + 9));
    qf[kb][3] = pack<T>(qAt(rb, c + 8), qAt(rb, c + 9));
  }
  float o[NT][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  __syncthreads();
  const int keys = key_count;
  auto load = [&](int k0, int stage) {
    T* Ks = tiles + 2 * stage * kTile;
    T* Vs = Ks + kTile;
    for (int i = threadIdx.x; i < kKeys * HD / 8; i += blockDim.x) {
      const int r = i / (HD / 8), c = i % (HD / 8) * 8;
      const bool in = k0 + r < keys;
      const int64_t from = int64_t(in ? k0 + r : 0) * HD + c;
      copyAsync<16>(&Ks[r * LD + c], Kh + from, in);
      copyAsync<16>(&Vs[r * LD + c], Vh + from, in);
    }
    commitCopies();
  };
  if (keys > 0) load(0, 0);
  for (int k0 = 0, stage = 0; k0 < keys; k0 += kKeys, stage ^= 1) {
    if (k0 + kKeys < keys) {
      load(k0 + kKeys, stage ^ 1);  // the stage the previous iteration finished reading
      waitCopies<1>();
    } else {
      waitCopies<0>();
    }
    __syncthreads();
    const T* Ks = tiles + 2 * stage * kTile;
    const T* Vs = Ks + kTile;
    auto keyPos = [&](int j) { return k0 + j < keys ? k_pos[k0 + j] : INT_MAX; };
    // Scores of the warp's 16 rows against the tile's 64 keys: 8 tiles of 8 keys.
    float s[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const T* kr = &Ks[(n * 8 + g) * LD + 2 * t];
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
        mma<T>(s[n], qf[kb], *reinterpret_cast<const uint32_t*>(kr + kb * 16),
               *reinterpret_cast<const uint32_t*>(kr + kb * 16 + 8));
    }
    // Mask by position, then the online softmax of rows a (c[0], c[1]) and b (c[2], c[3]); a row's
    // 64 scores are spread over the 4 lanes of its quad.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = keyPos(n * 8 + 2 * t + j);
        if (key > pa) s[n][j] = -INFINITY;
        if (key > pb) s[n][2 + j] = -INFINITY;
        mx[0] = fmaxf(mx[0], s[n][j]);
        mx[1] = fmaxf(mx[1], s[n][2 + j]);
      }
    float base[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      base[r] = mx[r] == -INFINITY ? 0.0f : mx[r];  // a row with nothing visible yet stays at zero
      corr[r] = __expf(m[r] - base[r]);
      m[r] = mx[r];
      l[r] *= corr[r];
    }
    uint32_t p[kKeys / 16][4];  // the probabilities as A fragments, 16 keys each
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      const float a0 = __expf(s[n][0] - base[0]), a1 = __expf(s[n][1] - base[0]);
      const float b0 = __expf(s[n][2] - base[1]), b1 = __expf(s[n][3] - base[1]);
      l[0] += a0 + a1;
      l[1] += b0 + b1;
      p[n / 2][(n % 2) * 2] = pack<T>(a0, a1);
      p[n / 2][(n % 2) * 2 + 1] = pack<T>(b0, b1);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= corr[0], o[n][1] *= corr[0];
      o[n][2] *= corr[1], o[n][3] *= corr[1];
    }
    // o += P (16 x 64) . V tile (64 x HD): per 16 keys, two output tiles of 8 channels per load.
#pragma unroll
    for (int kb = 0; kb < kKeys / 16; ++kb)
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        uint32_t b[4];
        loadTransposed(&Vs[(kb * 16 + (lane & 15)) * LD + n * 8 + (lane >> 4) * 8], b);
        mma<T>(o[n], p[kb], b[0], b[1]);
        mma<T>(o[n + 1], p[kb], b[2], b[3]);
      }
    __syncthreads();  // every warp is done with this stage before the next load overwrites it
  }
  // Row sums were kept per lane: add the quad's, then write each row's normalised output.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    l[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int c = h * HD + n * 8 + 2 * t;
    if (ra < rows) *reinterpret_cast<uint32_t*>(&out[int64_t(ra) * heads * HD + c]) = pack<T>(o[n][0] * l[0], o[n][1] * l[0]);
    if (rb < rows) *reinterpret_cast<uint32_t*>(&out[int64_t(rb) * heads * HD + c]) = pack<T>(o[n][2] * l[1], o[n][3] * l[1]);
  }
}

}  // namespace

template <class T>
bool flashAttentionFits(int head_dim) {
  return !std::is_same_v<T, float> && (head_dim == 64 || head_dim == 128);
}

template <class T>
void flashAttention(const float* q, int64_t q_stride, const int* q_pos, int rows, int heads, const T* K, const T* V,
                    const int* k_pos, int L, int kv_heads, int head_dim, int64_t capacity, float scale, T* out) {
  if (rows == 0 || L == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    throw std::runtime_error("cuda::flashAttention: fp16 or bf16 only");
  } else {
    const dim3 grid((rows + kRows - 1) / kRows, heads);
    const int group = heads / kv_heads;
    auto launch = [&](auto hd) {
      constexpr int HD = decltype(hd)::value, bytes = flashSharedBytes<T, HD>();
      static const bool opted_in = [] {  // more than the default 48 KB of dynamic shared memory
        KVTP_CUDA_CHECK(cudaFuncSetAttribute(flashKernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        return true;
      }();
      (void)opted_in;
      flashKernel<T, HD><<<grid, 32 * kWarps, bytes>>>(q, q_stride, q_pos, rows, group, K, V, k_pos, L, capacity, scale,
                                                      out);
    };
    if (head_dim == 64) launch(std::integral_constant<int, 64>{});
    else if (head_dim == 128) launch(std::integral_constant<int, 128>{});
    else throw std::runtime_error("cuda::flashAttention: head_dim 64 or 128 only");
    KVTP_CUDA_LAUNCHED();
  }
}

#define KVTP_FLASH(T)                                                                                            \
  template bool flashAttentionFits<T>(int);                                                                      \
  template void flashAttention<T>(const float*, int64_t, const int*, int, int, const T*, const T*, const int*, int, \
                                  int, int, int64_t, float, T*);
KVTP_FLASH(float)
KVTP_FLASH(__half)
KVTP_FLASH(__nv_bfloat16)
#undef KVTP_FLASH

}  // namespace kvtp::cuda
