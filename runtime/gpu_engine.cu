// The CUDA engine (gpu_engine.h): model.cpp's forward pass on the kernels of kernels/cuda/.
// Activations: the residual stream x stays float32; what feeds a matrix product (normed rows,
// attention output, MLP activations) is stored in T; every product accumulates in float32.
#include "runtime/gpu_engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <vector>

#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/forward_ops.h"
#include "runtime/error.h"

namespace kvtp {
namespace {

using cuda::DeviceBuffer;
using cuda::grow;

// Host float32 tensors, concatenated by rows, converted to T on the device (through a float32
// staging buffer, so a 7B model converts in seconds).
template <class T>
DeviceBuffer<T> upload(const std::vector<const Tensor*>& parts, DeviceBuffer<float>& staging) {
  size_t n = 0;
  for (auto* p : parts) n += p->size();
  DeviceBuffer<T> out(n);
  size_t at = 0;
  for (auto* p : parts) {
    constexpr size_t kChunk = size_t(1) << 26;
    for (size_t off = 0; off < p->size(); off += kChunk) {
      const size_t len = std::min(kChunk, p->size() - off);
      float* s = grow(staging, kChunk);
      KVTP_CUDA_CHECK(cudaMemcpy(s, p->data() + off, len * sizeof(float), cudaMemcpyHostToDevice));
      cuda::convert(s, int64_t(len), out.get() + at + off);
    }
    at += p->size();
  }
  KVTP_CUDA_CHECK(cudaDeviceSynchronize());
  return out;
}

DeviceBuffer<float> uploadFloat(const Tensor& t) { return t.empty() ? DeviceBuffer<float>() : DeviceBuffer<float>(t); }

// Biases of fused projections: the parts' biases side by side (zeros for a part without one);
// empty when no part has one.
DeviceBuffer<float> fusedBias(const std::vector<std::pair<const Tensor*, size_t>>& parts) {
  bool any = false;
  for (auto& [b, rows] : parts) any |= !b->empty();
  if (!any) return {};
  Tensor all;
  for (auto& [b, rows] : parts) {
    if (b->empty()) all.insert(all.end(), rows, 0.0f);
    else all.insert(all.end(), b->begin(), b->end());
  }
  return DeviceBuffer<float>(all);
}

template <class T>
struct GpuLayer {
  DeviceBuffer<float> attn_norm_w, attn_norm_b, ffn_norm_w, ffn_norm_b;
  DeviceBuffer<T> wqkv, wo, w_in, w_down;  // w_in: Llama gate|up (2F, H), OPT fc1 (F, H)
  DeviceBuffer<float> bqkv, bo, b_in, b_down;
  DeviceBuffer<T> K, V;  // the KV cache: [kv_head][capacity][head_dim]
};

template <class T>
class GpuEngine : public Engine {
 public:
  GpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source, const GpuOptions& o)
      : c_(config), part_(part), group_(o.device_group) {
    if (!std::set<int>{8, 16, 32, 64, 128, 256}.count(c_.head_dim))
      throw Error("the CUDA backend needs head_dim 8, 16, 32, 64, 128 or 256 (this model: " +
                  std::to_string(c_.head_dim) + ")");
    if (part_.tp > 1 && (!group_ || group_->size() != part_.tp))
      throw Error("the CUDA engine at tp " + std::to_string(part_.tp) + " needs a device communicator of that size");
    KVTP_CUDA_CHECK(cudaSetDevice(o.device));
    // The model-level tensors, then one layer at a time: the host holds one layer's float32
    // slices at most, so a 66B model loads on a machine with less memory than its weights.
    const ModelWeights w = source({0, 0, true});
    DeviceBuffer<float> staging;
    embed_ = upload<T>({&w.embed}, staging);
    if (!w.lm_head.empty()) lm_head_ = upload<T>({&w.lm_head}, staging);
    positions_ = uploadFloat(w.positions);
    if (!w.project_in.empty()) project_in_ = upload<T>({&w.project_in}, staging);
    if (!w.project_out.empty()) project_out_ = upload<T>({&w.project_out}, staging);
    final_norm_w_ = uploadFloat(w.final_norm_w);
    final_norm_b_ = uploadFloat(w.final_norm_b);
    const size_t Q = size_t(part_.q_heads) * c_.head_dim, KV = size_t(part_.kv_heads) * c_.head_dim,
                 F = size_t(part_.ffn());
    for (int l = 0; l < c_.layers; ++l) {
      const ModelWeights piece = source({l, l + 1, false});
      const LayerWeights& L = piece.layers[l];
      GpuLayer<T>& g = layers_.emplace_back();
      g.attn_norm_w = uploadFloat(L.attn_norm_w);
      g.attn_norm_b = uploadFloat(L.attn_norm_b);
      g.ffn_norm_w = uploadFloat(L.ffn_norm_w);
      g.ffn_norm_b = uploadFloat(L.ffn_norm_b);
      g.wqkv = upload<T>({&L.wq, &L.wk, &L.wv}, staging);
      g.bqkv = fusedBias({{&L.bq, Q}, {&L.bk, KV}, {&L.bv, KV}});
      g.wo = upload<T>({&L.wo}, staging);
      g.bo = part_.rank == 0 ? uploadFloat(L.bo) : DeviceBuffer<float>();  // added once
      if (c_.family == Family::Llama) {
        g.w_in = upload<T>({&L.w_gate, &L.w_up}, staging);
        g.b_in = fusedBias({{&L.b_gate, F}, {&L.b_up, F}});
      } else {
        g.w_in = upload<T>({&L.w_up}, staging);
        g.b_in = uploadFloat(L.b_up);
      }
      g.w_down = upload<T>({&L.w_down}, staging);
      g.b_down = part_.rank == 0 ? uploadFloat(L.b_down) : DeviceBuffer<float>();
    }
    if (c_.family == Family::Llama) inv_freq_ = DeviceBuffer<float>(ropeInverseFrequencies(c_));
  }

  void startWindow() override { length_ = 0, positions_host_.clear(); }
  void compress(int, bool) override {}
  bool compresses() const override { return false; }
  kv::KvBytes kvBytes(int tokens_seen) const override {
    const int64_t b = kv::fullCacheBytes(tokens_seen, c_.layers, part_.kv_heads, c_.head_dim);  // docs/KV.md
    return {b, b};
  }

  std::vector<double> step(const int* tokens, const int* positions, int rows, int from, int count,
                           const int* targets) override {
    checkTokens(c_, tokens, positions, rows);
    reserve(length_ + rows);
    int* d_tokens = grow(tokens_, rows);
    KVTP_CUDA_CHECK(cudaMemcpy(d_tokens, tokens, sizeof(int) * rows, cudaMemcpyHostToDevice));
    // Positions of the new tokens are the tail of the cache's position index.
    KVTP_CUDA_CHECK(cudaMemcpy(k_pos_.get() + length_, positions, sizeof(int) * rows, cudaMemcpyHostToDevice));
    positions_host_.insert(positions_host_.end(), positions, positions + rows);
    const int* d_pos = k_pos_.get() + length_;

    const int H = c_.hidden, P = c_.word_embed_proj_dim;
    float* x = grow(x_, size_t(rows) * H);
    T* xn = grow(xn_, size_t(rows) * std::max(H, P));
    {  // embed (vocab-parallel), project in, OPT positions
      float* e = c_.hasProjection() ? grow(e_, size_t(rows) * P) : x;
      cuda::embed(d_tokens, rows, embed_.get(), int(part_.vocab_begin), int(part_.vocab_end), P, e);
      allReduce(e, size_t(rows) * P);
      if (c_.hasProjection()) {
        cuda::convert(e, int64_t(rows) * P, xn);
        cuda::gemm(blas_, xn, rows, P, project_in_.get(), H, nullptr, x, false);
      }
      if (c_.family == Family::Opt) cuda::addPositions(x, rows, H, positions_.get(), d_pos, 2);
    }
    const float eps = float(c_.norm_eps);
    for (int l = 0; l < c_.layers; ++l) {
      const GpuLayer<T>& L = layers_[l];
      if (c_.family == Family::Llama) {
        cuda::rmsNormTo(x, rows, H, L.attn_norm_w.get(), eps, xn);
        attention(l, xn, d_pos, rows, x);
        cuda::rmsNormTo(x, rows, H, L.ffn_norm_w.get(), eps, xn);
        mlp(l, xn, rows, x);
      } else if (c_.pre_layer_norm) {
        cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, xn);
        attention(l, xn, d_pos, rows, x);
        cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, xn);
        mlp(l, xn, rows, x);
      } else {  // OPT post-LN: norm after each residual add
        cuda::convert(x, int64_t(rows) * H, xn);
        attention(l, xn, d_pos, rows, x);
        cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, x);
        cuda::convert(x, int64_t(rows) * H, xn);
        mlp(l, xn, rows, x);
        cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, x);
      }
    }
    length_ += rows;
    if (count == 0) {
      KVTP_CUDA_CHECK(cudaDeviceSynchronize());
      return {};
    }
    // The head reads rows from .. from + count - 1 only.
    float* xr = x + size_t(from) * H;
    if (!final_norm_w_.size()) cuda::convert(xr, int64_t(count) * H, xn);
    else if (c_.family == Family::Llama) cuda::rmsNormTo(xr, count, H, final_norm_w_.get(), eps, xn);
    else cuda::layerNormTo(xr, count, H, final_norm_w_.get(), final_norm_b_.get(), eps, xn);
    if (c_.hasProjection()) {
      float* e = grow(e_, size_t(count) * P);
      cuda::gemm(blas_, xn, count, H, project_out_.get(), P, nullptr, e, false);
      cuda::convert(e, int64_t(count) * P, xn);
    }
    return logprobs(xn, count, targets);
  }

 private:
  void allReduce(float* data, size_t n) {
    if (part_.tp > 1) group_->allReduceSum(data, n);
  }

  // Makes room for `need` cached tokens, keeping what is cached (grows geometrically).
  void reserve(int need) {
    if (need <= capacity_) return;
    const int64_t cap = std::max<int64_t>({need, 2 * int64_t(capacity_), 256});
    const size_t hd = c_.head_dim, row = hd * sizeof(T);
    for (auto& L : layers_)
      for (DeviceBuffer<T>* buf : {&L.K, &L.V}) {
        DeviceBuffer<T> bigger(size_t(part_.kv_heads) * cap * hd);
        if (length_ > 0)  // each head's rows move to the start of its new, longer span
          KVTP_CUDA_CHECK(cudaMemcpy2D(bigger.get(), cap * row, buf->get(), capacity_ * row, length_ * row,
                                       part_.kv_heads, cudaMemcpyDeviceToDevice));
        *buf = std::move(bigger);
      }
    DeviceBuffer<int> pos(cap);
    if (length_ > 0) KVTP_CUDA_CHECK(cudaMemcpy(pos.get(), k_pos_.get(), length_ * sizeof(int), cudaMemcpyDeviceToDevice));
    k_pos_ = std::move(pos);
    capacity_ = int(cap);
  }

  // x += o_proj(attention(qkv_proj(xn))), the new tokens' K/V appended to the cache first.
  void attention(int layer, const T* xn, const int* d_pos, int T_, float* x) {
    const GpuLayer<T>& L = layers_[layer];
    const int hd = c_.head_dim, Q = part_.q_heads * hd, KV = part_.kv_heads * hd, W = Q + 2 * KV;
    float* qkv = grow(qkv_, size_t(T_) * W);
    cuda::gemm(blas_, xn, T_, c_.hidden, L.wqkv.get(), W, L.bqkv.get(), qkv, false);
    cuda::ropeAppendKV(qkv, T_, part_.q_heads, part_.kv_heads, hd, d_pos, inv_freq_.size() ? inv_freq_.get() : nullptr,
                       L.K.get(), L.V.get(), capacity_, length_);
    const int cached = length_ + T_;
    const float scale = float(1.0 / std::sqrt(double(hd)));
    T* ctx = grow(ctx_, size_t(T_) * Q);
    // Few queries: flash-decoding over the cache; many: score matrices through tensor-core GEMMs.
    if (T_ <= 8) {
      cuda::attention(qkv, W, d_pos, T_, part_.q_heads, L.K.get(), L.V.get(), k_pos_.get(), cached, part_.kv_heads,
                      hd, int64_t(capacity_) * hd, scale, ctx);
    } else {
      cuda::attentionPrefill(blas_, qkv, W, d_pos, positions_host_.data() + length_, T_, part_.q_heads, L.K.get(),
                             L.V.get(), k_pos_.get(), positions_host_.data(), cached, part_.kv_heads, hd, capacity_,
                             scale, ctx, size_t(1) << 30);
    }
    rowParallel(ctx, T_, Q, L.wo.get(), L.bo.get(), x);
  }

  void mlp(int layer, const T* xn, int T_, float* x) {
    const GpuLayer<T>& L = layers_[layer];
    const int F = part_.ffn();
    T* act = grow(act_, size_t(T_) * F);
    if (c_.family == Family::Llama) {
      float* gu = grow(h_, size_t(T_) * 2 * F);
      cuda::gemm(blas_, xn, T_, c_.hidden, L.w_in.get(), 2 * F, L.b_in.get(), gu, false);
      cuda::siluMulTo(gu, T_, F, act);
    } else {
      float* h = grow(h_, size_t(T_) * F);
      cuda::gemm(blas_, xn, T_, c_.hidden, L.w_in.get(), F, L.b_in.get(), h, false);
      cuda::reluTo(h, int64_t(T_) * F, act);
    }
    rowParallel(act, T_, F, L.w_down.get(), L.b_down.get(), x);
  }

  // x += all-reduce(in · W^T) (+ bias, on rank 0 only).
  void rowParallel(const T* in, int T_, int in_dim, const T* W, const float* bias, float* x) {
    const int H = c_.hidden;
    if (part_.tp == 1) return cuda::gemm(blas_, in, T_, in_dim, W, H, bias, x, true);
    float* partial = grow(partial_, size_t(T_) * H);
    cuda::gemm(blas_, in, T_, in_dim, W, H, bias, partial, false);
    group_->allReduceSum(partial, size_t(T_) * H);
    cuda::addInPlace(x, partial, int64_t(T_) * H);
  }

  // log p(targets) from `rows` hidden rows (type T): vocab-parallel partials, gathered across
  // ranks and combined in rank order as on the CPU.
  std::vector<double> logprobs(const T* hidden, int rows, const int* targets) {
    const int P = c_.word_embed_proj_dim, V = part_.vocab();
    const T* head = lm_head_.size() ? lm_head_.get() : embed_.get();
    constexpr int kRows = 256;
    int* d_targets = grow(targets_, rows);
    KVTP_CUDA_CHECK(cudaMemcpy(d_targets, targets, sizeof(int) * rows, cudaMemcpyHostToDevice));
    float* logits = grow(logits_, size_t(std::min(rows, kRows)) * V);
    auto* mine = grow(partials_, size_t(kRows) * (part_.tp > 1 ? part_.tp + 1 : 1));
    auto* all = part_.tp > 1 ? mine + kRows : mine;  // every rank's partials, in rank order
    std::vector<kernels::SoftmaxPartial> host(size_t(kRows) * part_.tp);
    std::vector<double> out(rows);
    for (int r0 = 0; r0 < rows; r0 += kRows) {
      const int n = std::min(kRows, rows - r0);
      cuda::gemm(blas_, hidden + size_t(r0) * P, n, P, head, V, nullptr, logits, false);
      cuda::softmaxPartials(logits, n, V, int(part_.vocab_begin), d_targets + r0, mine);
      if (part_.tp > 1) group_->allGather(mine, sizeof(kernels::SoftmaxPartial) * kRows, all);
      KVTP_CUDA_CHECK(cudaMemcpy(host.data(), all, sizeof(kernels::SoftmaxPartial) * host.size(), cudaMemcpyDeviceToHost));
      for (int i = 0; i < n; ++i) {
        kernels::SoftmaxPartial p = host[i];
        for (int r = 1; r < part_.tp; ++r) p.combine(host[size_t(r) * kRows + i]);
        out[r0 + i] = p.logprob();
      }
    }
    return out;
  }

  ModelConfig c_;
  Partition part_;
  comm::Communicator* group_;
  cuda::Blas blas_;
  DeviceBuffer<T> embed_, lm_head_, project_in_, project_out_;
  DeviceBuffer<float> positions_, final_norm_w_, final_norm_b_, inv_freq_;
  std::vector<GpuLayer<T>> layers_;
  int length_ = 0, capacity_ = 0;  // cached tokens; room per head
  DeviceBuffer<int> k_pos_;        // positions of the cached tokens (every head keeps all of them)
  std::vector<int> positions_host_;
  // Grow-only activations: after the first step of the longest shape, nothing is allocated.
  DeviceBuffer<int> tokens_, targets_;
  DeviceBuffer<float> x_, e_, qkv_, h_, partial_, logits_;
  DeviceBuffer<T> xn_, ctx_, act_;
  DeviceBuffer<kernels::SoftmaxPartial> partials_;
};

}  // namespace

int64_t deviceBytesPeak() { return cuda::DeviceMemory::peak.load(); }
int cudaDevices() { return cuda::deviceCount(); }

double peakMemoryBandwidth(int device) {
  int khz = 0, bits = 0;
  KVTP_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
  KVTP_CUDA_CHECK(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device));
  return 2.0 * khz * 1e3 * bits / 8;
}

int localDevice() {
  const int n = cuda::deviceCount();
  if (n == 0) throw Error("--device cuda: no CUDA device is visible to this process");
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  return local ? std::atoi(local) % n : 0;
}

std::unique_ptr<Engine> makeGpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source,
                                      const GpuOptions& o) {
  switch (o.dtype) {
    case Precision::F32: return std::make_unique<GpuEngine<float>>(config, part, source, o);
    case Precision::F16: return std::make_unique<GpuEngine<__half>>(config, part, source, o);
    case Precision::BF16: return std::make_unique<GpuEngine<__nv_bfloat16>>(config, part, source, o);
  }
  throw Error("unknown dtype");
}

std::unique_ptr<comm::Communicator> makeDeviceGroup(comm::Communicator& host_group, int device) {
  return comm::makeNccl(host_group, device);
}

}  // namespace kvtp
