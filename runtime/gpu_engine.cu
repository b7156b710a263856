// The CUDA engine (gpu_engine.h): model.cpp's forward pass on the kernels of kernels/cuda/.
// Activations: the residual stream x stays float32; what feeds a matrix product (normed rows,
// attention output, MLP activations) is stored in T; every product accumulates in float32.
#include "runtime/gpu_engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <type_traits>
#include <vector>

#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/forward_ops.h"
#include "runtime/error.h"
#include "runtime/partition.h"

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
  DeviceBuffer<T> K, V;    // the KV cache: [kv_head][capacity][head_dim]
  DeviceBuffer<int> pos;  // the cached rows' positions: [kv_head][capacity]
  // An int8 cache instead of K, V: codes [kv_head][capacity][head_dim], steps [kv_head][capacity].
  DeviceBuffer<int8_t> K8, V8;
  DeviceBuffer<float> k_step, v_step;
};

template <class T>
class GpuEngine : public Engine {
 public:
  GpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source, const GpuOptions& o)
      : c_(config), part_(part), group_(o.device_group), len_(size_t(config.layers) * part.kv_heads, 0),
        policy_(o.kv, headLayout(config, part), o.host_group),
        mirror_(config.layers, part.kv_heads, config.head_dim, true),
        row_positions_(len_.size()), int8_(o.kv.quant == kv::Quant::Int8), time_collectives_(o.time_collectives) {
    checkGpuCompression(o.kv);
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

  void startWindow() override {
    std::fill(len_.begin(), len_.end(), 0);
    longest_ = 0, observed_len_ = 0, uniform_ = true;
    positions_host_.clear();
    mirror_.clear();
    for (auto& p : row_positions_) p.clear();
    policy_.startWindow();
  }
  bool compresses() const override { return policy_.spec().compresses(); }
  kv::KvBytes kvBytes(int tokens_seen) const override {
    if (compresses()) return policy_.bytes(mirror_, tokens_seen);
    const int64_t b = kv::fullCacheBytes(tokens_seen, c_.layers, part_.kv_heads, c_.head_dim);  // docs/KV.md
    return {b, b};
  }

  // The policy decides on the mirror (scored by the prefill's observation window when it asks for
  // attention); each head's kept entries are a subsequence of what it held, so matching positions
  // gives the rows the device keeps.
  void compress(int last_pos, bool prefill) override {
    if (!compresses()) return;
    const int H = part_.kv_heads, LH = c_.layers * H;
    attention_.T = 0;
    attention_.blocks.assign(size_t(LH), {});
    if (observed_len_ > 0) {  // the prefill's observed rows (summed into one unless observed_rows_ > 1)
      const size_t block = size_t(observed_rows_) * observed_len_;
      std::vector<float> all(size_t(LH) * block);
      KVTP_CUDA_CHECK(cudaMemcpy(all.data(), observed_.get(), all.size() * sizeof(float), cudaMemcpyDeviceToHost));
      attention_.T = observed_rows_;
      for (int i = 0; i < LH; ++i) attention_.blocks[i].assign(all.begin() + i * block, all.begin() + (i + 1) * block);
      observed_len_ = 0;
    } else if (weights_pending_) {  // a decode step's probabilities, (layer, KV head, capacity)
      std::vector<float> all(size_t(LH) * longest_);
      KVTP_CUDA_CHECK(cudaMemcpy2D(all.data(), longest_ * sizeof(float), weights_.get(), capacity_ * sizeof(float),
                                   longest_ * sizeof(float), LH, cudaMemcpyDeviceToHost));
      attention_.T = 1;
      for (int i = 0; i < LH; ++i)
        attention_.blocks[i].assign(all.begin() + int64_t(i) * longest_, all.begin() + int64_t(i) * longest_ + len_[i]);
      weights_pending_ = false;
    }
    policy_.afterStep(mirror_, attention_, last_pos, prefill);
    for (int l = 0; l < c_.layers; ++l) {
      bool changed = false;
      for (int h = 0; h < H; ++h) changed |= mirror_.head(l, h).length() != len_[size_t(l) * H + h];
      if (!changed) continue;
      int max_kept = 0;
      for (int h = 0; h < H; ++h) max_kept = std::max(max_kept, mirror_.head(l, h).length());
      std::vector<int> keep(size_t(H) * max_kept + H, 0);  // rows per head, then counts
      for (int h = 0; h < H; ++h) {
        auto& was = row_positions_[size_t(l) * H + h];
        const auto& now = mirror_.head(l, h).positions;
        size_t j = 0;
        for (size_t i = 0; i < now.size(); ++i, ++j) {
          while (was[j] != now[i]) ++j;
          keep[size_t(h) * max_kept + i] = int(j);
        }
        keep[size_t(H) * max_kept + h] = len_[size_t(l) * H + h] = int(now.size());
        was = now;
      }
      int* d_keep = grow(keep_, keep.size());
      KVTP_CUDA_CHECK(cudaMemcpy(d_keep, keep.data(), keep.size() * sizeof(int), cudaMemcpyHostToDevice));
      GpuLayer<T>& L = layers_[l];
      const int* kept = d_keep + size_t(H) * max_kept;
      if (int8_) {
        cuda::compactKV(L.K8.get(), L.V8.get(), L.pos.get(), capacity_, H, c_.head_dim, d_keep, kept, max_kept);
        cuda::compactKV(L.k_step.get(), L.v_step.get(), nullptr, capacity_, H, 1, d_keep, kept, max_kept);
      } else {
        cuda::compactKV(L.K.get(), L.V.get(), L.pos.get(), capacity_, H, c_.head_dim, d_keep, kept, max_kept);
      }
      uniform_ = false;
    }
    longest_ = *std::max_element(len_.begin(), len_.end());
  }

  std::vector<double> step(const int* tokens, const int* positions, int rows, int from, int count,
                           const int* targets) override {
    checkTokens(c_, tokens, positions, rows);
    // The policy scores by attention: several tokens go through the prefill path, which leaves
    // the probabilities of the rows it observes (even for a short prompt); one token through
    // flash-decoding, which leaves its own when a policy evicts during decoding.
    const kv::PolicySpec& spec = policy_.spec();
    const bool observe = spec.needsAttention() && rows > 1;
    weights_pending_ = rows == 1 && spec.scoresDecoding();
    if (observe) {
      // H2O sums every row; Scissorhands keeps a bit per row for its last `history` rows (earlier
      // bits would age out of its mask anyway); SnapKV / PyramidKV sum their observation window.
      observed_rows_ = spec.method == kv::Method::Scissorhands ? std::min(rows, std::min(spec.history, 64)) : 1;
      observe_from_ = spec.method == kv::Method::H2O ? 0
                      : spec.method == kv::Method::Scissorhands ? rows - observed_rows_
                                                                : rows - spec.window;
    }
    const bool many = rows > 8 || observe;
    if (many && !uniform_)
      throw Error("the CUDA engine scores several tokens at once only over an uncompressed cache; a compressed "
                  "window goes on token by token");
    reserve(longest_ + rows);
    int* d_tokens = grow(tokens_, rows);
    KVTP_CUDA_CHECK(cudaMemcpy(d_tokens, tokens, sizeof(int) * rows, cudaMemcpyHostToDevice));
    // One upload: the new tokens' positions, then each head's first free slot, then its count after.
    const int LH = c_.layers * part_.kv_heads;
    std::vector<int> meta(positions, positions + rows);
    meta.insert(meta.end(), len_.begin(), len_.end());
    for (int n : len_) meta.push_back(n + rows);
    int* d_meta = grow(meta_, meta.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
    positions_host_.insert(positions_host_.end(), positions, positions + rows);
    if (compresses()) {
      for (int l = 0; l < c_.layers; ++l) mirror_.append(l, nullptr, nullptr, positions, rows);
      for (auto& p : row_positions_) p.insert(p.end(), positions, positions + rows);
    }
    if (observe) {
      observed_len_ = longest_ + rows;
      const size_t n = size_t(LH) * observed_rows_ * observed_len_;
      KVTP_CUDA_CHECK(cudaMemset(grow(observed_, n), 0, n * sizeof(float)));
    }
    if (weights_pending_) grow(weights_, size_t(LH) * capacity_);  // before a graph is captured
    // The device work of the step reads only device buffers and this step's shape; a decode step
    // (one token) replays it as a CUDA graph (captured at the second step of the same capacity).
    auto launches = [&] { forward(d_tokens, d_meta, rows, many, observe); };
    if (rows == 1 && !observe) {
      if (decode_graph_.run(capacity_, launches)) collectives_.replayed(graph_marks_);
      else graph_marks_ = collectives_.marks();
    } else {
      launches();
    }
    for (int& n : len_) n += rows;
    longest_ += rows;
    if (count == 0) {
      KVTP_CUDA_CHECK(cudaDeviceSynchronize());
      collectives_.collect();
      return {};
    }
    // The head reads rows from .. from + count - 1 only.
    const int H = c_.hidden, P = c_.word_embed_proj_dim;
    const float eps = float(c_.norm_eps);
    T* xn = xn_.get();
    float* xr = x_.get() + size_t(from) * H;
    if (!final_norm_w_.size()) cuda::convert(xr, int64_t(count) * H, xn);
    else if (c_.family == Family::Llama) cuda::rmsNormTo(xr, count, H, final_norm_w_.get(), eps, xn);
    else cuda::layerNormTo(xr, count, H, final_norm_w_.get(), final_norm_b_.get(), eps, xn);
    if (c_.hasProjection()) {
      float* e = grow(e_, size_t(count) * P);
      cuda::gemm(blas_, xn, count, H, project_out_.get(), P, nullptr, e, false);
      cuda::convert(e, int64_t(count) * P, xn);
    }
    auto out = logprobs(xn, count, targets);  // ends with a copy to the host: the step is complete
    collectives_.collect();
    return out;
  }
  double collectiveSeconds() const override { return collectives_.seconds(); }

 private:
  void allReduce(float* data, size_t n) {
    if (part_.tp > 1) timed([&] { group_->allReduceSum(data, n); });
  }
  // A collective between two marks of the collective timer.
  template <class F>
  void timed(F&& collective) {
    if (time_collectives_) collectives_.mark();
    collective();
    if (time_collectives_) collectives_.mark();
  }

  // Makes room for `need` cached tokens, keeping what is cached (grows geometrically).
  void reserve(int need) {
    if (need <= capacity_) return;
    const int64_t cap = std::max<int64_t>({need, 2 * int64_t(capacity_), 256});
    // Each head's rows (and positions) move to the start of its new, longer span.
    auto regrow = [&](auto& buf, size_t width) {
      using E = typename std::remove_reference_t<decltype(buf)>::value_type;
      std::remove_reference_t<decltype(buf)> bigger(size_t(part_.kv_heads) * cap * width);
      const size_t row = width * sizeof(E);
      if (longest_ > 0)
        KVTP_CUDA_CHECK(cudaMemcpy2D(bigger.get(), cap * row, buf.get(), capacity_ * row, longest_ * row,
                                     part_.kv_heads, cudaMemcpyDeviceToDevice));
      buf = std::move(bigger);
    };
    for (auto& L : layers_) {
      if (int8_) {
        regrow(L.K8, c_.head_dim);
        regrow(L.V8, c_.head_dim);
        regrow(L.k_step, 1);
        regrow(L.v_step, 1);
      } else {
        regrow(L.K, c_.head_dim);
        regrow(L.V, c_.head_dim);
      }
      regrow(L.pos, 1);
    }
    capacity_ = int(cap);
  }

  // Embedding and every layer for `rows` tokens into x_ (d_meta: their positions, then each KV
  // head's first free slot, then its count after): kernel launches only, no host synchronisation.
  void forward(const int* d_tokens, const int* d_meta, int rows, bool many, bool observe) {
    const int LH = c_.layers * part_.kv_heads;
    const int* d_pos = d_meta;
    auto attend = [&](int l, const T* in, float* x) {
      attention(l, in, d_pos, d_meta + rows + l * part_.kv_heads, d_meta + rows + LH + l * part_.kv_heads, rows, many,
                observe, x);
    };

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
    if (inv_freq_.size()) cuda::ropeTable(d_pos, rows, c_.head_dim, inv_freq_.get(), grow(rope_, size_t(rows) * c_.head_dim / 2));
    const float eps = float(c_.norm_eps);
    for (int l = 0; l < c_.layers; ++l) {
      const GpuLayer<T>& L = layers_[l];
      if (c_.family == Family::Llama) {
        cuda::rmsNormTo(x, rows, H, L.attn_norm_w.get(), eps, xn);
        attend(l, xn, x);
        cuda::rmsNormTo(x, rows, H, L.ffn_norm_w.get(), eps, xn);
        mlp(l, xn, rows, x);
      } else if (c_.pre_layer_norm) {
        cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, xn);
        attend(l, xn, x);
        cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, xn);
        mlp(l, xn, rows, x);
      } else {  // OPT post-LN: norm after each residual add
        cuda::convert(x, int64_t(rows) * H, xn);
        attend(l, xn, x);
        cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, x);
        cuda::convert(x, int64_t(rows) * H, xn);
        mlp(l, xn, rows, x);
        cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, x);
      }
    }
  }

  // x += o_proj(attention(qkv_proj(xn))), the new tokens' K/V appended to the cache first:
  // at `slots` (each KV head's count before), `lengths` its count after (device arrays).
  void attention(int layer, const T* xn, const int* d_pos, const int* slots, const int* lengths, int T_, bool many,
                 bool observe, float* x) {
    GpuLayer<T>& L = layers_[layer];
    const int hd = c_.head_dim, H = part_.kv_heads, Q = part_.q_heads * hd, KV = H * hd, W = Q + 2 * KV;
    float* qkv = grow(qkv_, size_t(T_) * W);
    // Where the new rows go in T: the cache; with an int8 cache, nowhere for one query (attention
    // reads them from qkv), for many a stage the prefill attention reads, the cached rows
    // dequantized in front of them. An int8 cache gets them quantized after RoPE.
    T *K = L.K.get(), *V = L.V.get();
    int* k_pos = L.pos.get();
    int64_t capacity = capacity_;
    const cuda::Int8Append int8{hd, L.K8.get(), L.V8.get(), L.k_step.get(), L.v_step.get(), L.pos.get(), capacity_,
                                qkv, W, Q, Q + KV, slots, d_pos};
    if (int8_) {
      K = V = nullptr;
      if (many) {
        capacity = longest_ + T_;
        K = grow(stage_k_, size_t(H) * capacity * hd), V = grow(stage_v_, size_t(H) * capacity * hd);
        k_pos = grow(stage_pos_, size_t(H) * capacity);
        cuda::dequantizeRows(int8, H, longest_, K, V, k_pos, capacity);
      }
    }
    const cuda::KvAppend<T> append{part_.q_heads, H, hd, d_pos, inv_freq_.size() ? rope_.get() : nullptr,
                                   K, V, k_pos, capacity, slots};
    cuda::qkvAppend(blas_, xn, T_, c_.hidden, L.wqkv.get(), L.bqkv.get(), qkv, append);
    if (int8_) cuda::quantizeAppend(T_, H, int8);
    const float scale = float(1.0 / std::sqrt(double(hd)));
    T* ctx = grow(ctx_, size_t(T_) * Q);
    // Few queries: flash-decoding over each head's rows (bounded by the capacity, so the launch is
    // the same every step); many (an uncompressed cache, every head at the same positions, head
    // 0's read): the prefill attention.
    if (!many) {
      float* weights = weights_pending_ ? weights_.get() + size_t(layer) * H * capacity_ : nullptr;
      if (int8_) {
        const cuda::Int8Rows rows{L.k_step.get(), L.v_step.get(), qkv + Q, qkv + Q + KV, W, slots};
        cuda::attention(qkv, W, d_pos, T_, part_.q_heads, L.K8.get(), L.V8.get(), L.pos.get(), capacity_, H, hd,
                        int64_t(capacity_) * hd, scale, ctx, lengths, capacity_, weights, &rows);
      } else {
        cuda::attention(qkv, W, d_pos, T_, part_.q_heads, L.K.get(), L.V.get(), L.pos.get(), capacity_, H, hd,
                        int64_t(capacity_) * hd, scale, ctx, lengths, capacity_, weights);
      }
    } else {
      float* observed = observe ? observed_.get() + size_t(layer) * H * observed_rows_ * observed_len_ : nullptr;
      cuda::attentionPrefill(blas_, qkv, W, d_pos, positions_host_.data() + longest_, T_, part_.q_heads, K, V, k_pos,
                             positions_host_.data(), longest_ + T_, H, hd, capacity, scale, ctx, size_t(1) << 30,
                             observed, observe_from_, observed_rows_ > 1);
    }
    rowParallel(ctx, T_, Q, L.wo.get(), L.bo.get(), x);
  }

  void mlp(int layer, const T* xn, int T_, float* x) {
    const GpuLayer<T>& L = layers_[layer];
    const int F = part_.ffn();
    const bool llama = c_.family == Family::Llama;
    T* act = grow(act_, size_t(T_) * F);
    float* scratch = grow(h_, size_t(T_) * (llama ? 2 : 1) * F);
    cuda::gemmActivation(blas_, xn, T_, c_.hidden, L.w_in.get(), F, L.b_in.get(),
                         llama ? cuda::Activation::SiluMul : cuda::Activation::Relu, scratch, act);
    rowParallel(act, T_, F, L.w_down.get(), L.b_down.get(), x);
  }

  // x += all-reduce(in · W^T) (+ bias, on rank 0 only).
  void rowParallel(const T* in, int T_, int in_dim, const T* W, const float* bias, float* x) {
    const int H = c_.hidden;
    if (part_.tp == 1) return cuda::gemm(blas_, in, T_, in_dim, W, H, bias, x, true);
    float* partial = grow(partial_, size_t(T_) * H);
    cuda::gemm(blas_, in, T_, in_dim, W, H, bias, partial, false);
    allReduce(partial, size_t(T_) * H);
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
      if (part_.tp > 1) timed([&] { group_->allGather(mine, sizeof(kernels::SoftmaxPartial) * kRows, all); });
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
  DeviceBuffer<float2> rope_;  // this step's RoPE rotations (cuda::ropeTable)
  std::vector<GpuLayer<T>> layers_;
  // The cache: entries per (layer, KV head), their maximum, room per head; while no eviction has
  // run this window every head holds the same positions, positions_host_.
  std::vector<int> len_;
  int longest_ = 0, capacity_ = 0;
  bool uniform_ = true;
  std::vector<int> positions_host_;
  // Compression: the policy, the host mirror it decides on, the prefill's observed probabilities
  // [layer][kv_head][observed_rows_][observed_len_] (observed_len_ 0: none pending).
  kv::Policy policy_;
  kv::KVCache mirror_;
  std::vector<std::vector<int32_t>> row_positions_;  // per (layer, KV head): its device rows' positions
  kv::StepAttention attention_;
  DeviceBuffer<float> observed_;
  int observed_rows_ = 1, observe_from_ = 0;  // the prefill's observation: rows kept apart (1: summed), first row
  // A decode step's probabilities [layer][kv_head][capacity], for policies that evict as they decode.
  DeviceBuffer<float> weights_;
  bool weights_pending_ = false;
  // An int8 cache (GpuLayer::K8...), and the stage a many-row step reads it through in T.
  const bool int8_;
  DeviceBuffer<T> stage_k_, stage_v_;
  DeviceBuffer<int> stage_pos_;
  const bool time_collectives_;
  cuda::StreamTimer collectives_;  // GPU time inside NCCL collectives (tp > 1); outlives the graph
  cuda::GraphReplay decode_graph_;
  size_t graph_marks_ = 0;  // collective-timer marks of the captured decode step
  int observed_len_ = 0;
  // Grow-only activations: after the first step of the longest shape, nothing is allocated.
  DeviceBuffer<int> tokens_, targets_, meta_, keep_;
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
