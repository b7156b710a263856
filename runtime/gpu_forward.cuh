// The CUDA engine's forward pass (runtime/gpu_engine.cu's GpuEngine, its members defined here;
// included by gpu_engine.cu after the class, inside its namespace: not a header to include
// elsewhere): the embedding, each layer's norms, attention (runtime/gpu_attention.cuh) and MLP,
// the row-parallel products and their all-reduce.

template <class T>
void GpuEngine<T>::forward(const int* d_tokens, const int* d_meta, const Shape& shape) {
  const int rows = shape.rows, BH = int(seqs_.size()) * part_.kv_heads, LBH = c_.layers * BH;
  const int* d_pos = d_meta;
  const int* compact = d_meta + rows + 2 * LBH;  // KIVI's, low rank's counts per (layer, sequence, KV head)
  const int head0 = shape.batch ? 0 : current_ * part_.kv_heads;  // the first KV head the step touches
  auto attend = [&](int l, const T* in, float* x, const Norms& norms) {
    const int* slots = d_meta + rows + l * BH + head0;
    attention(l, in, d_pos, slots, slots + LBH, compact + l * BH + head0, shape, x, norms);
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
  if (inv_freq_.size())
    cuda::ropeTable(d_pos, rows, c_.head_dim, inv_freq_.get(), grow(rope_, size_t(rows) * c_.head_dim / 2));
  const float eps = float(c_.norm_eps);
  // One row on one GPU (decode): every RMSNorm after the first is folded into the products
  // around it (cuda::DeferredNorm): the residual's last product emits it, the next one scales.
  const bool defer = deferNorms(rows);
  float* sums = defer ? grow(norm_sums_, cuda::deferredNormSums(H)) : nullptr;
  auto deferred = [&](const DeviceBuffer<float>& w) { return cuda::DeferredNorm<T>{w.get(), xn, sums, eps}; };
  for (int l = 0; l < c_.layers; ++l) {
    const GpuLayer<T>& L = layers_[l];
    if (defer) {
      if (l == 0) cuda::rmsNormTo(x, rows, H, L.attn_norm_w.get(), eps, xn);
      const cuda::DeferredNorm<T> attn = deferred(L.attn_norm_w), ffn = deferred(L.ffn_norm_w);
      attend(l, xn, x, {l > 0 ? &attn : nullptr, &ffn});
      const bool last = l + 1 == c_.layers;
      const cuda::DeferredNorm<T> next = last ? cuda::DeferredNorm<T>{} : deferred(layers_[l + 1].attn_norm_w);
      mlp(l, xn, rows, x, {&ffn, last ? nullptr : &next});
    } else if (c_.family == Family::Llama) {
      cuda::rmsNormTo(x, rows, H, L.attn_norm_w.get(), eps, xn);
      attend(l, xn, x, {});
      cuda::rmsNormTo(x, rows, H, L.ffn_norm_w.get(), eps, xn);
      mlp(l, xn, rows, x, {});
    } else if (c_.pre_layer_norm) {
      cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, xn);
      attend(l, xn, x, {});
      cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, xn);
      mlp(l, xn, rows, x, {});
    } else {  // OPT post-LN: norm after each residual add
      cuda::convert(x, int64_t(rows) * H, xn);
      attend(l, xn, x, {});
      cuda::layerNormTo(x, rows, H, L.attn_norm_w.get(), L.attn_norm_b.get(), eps, x);
      cuda::convert(x, int64_t(rows) * H, xn);
      mlp(l, xn, rows, x, {});
      cuda::layerNormTo(x, rows, H, L.ffn_norm_w.get(), L.ffn_norm_b.get(), eps, x);
    }
  }
}

template <class T>
void GpuEngine<T>::mlp(int layer, const T* xn, int T_, float* x, const Norms& norms) {
  const GpuLayer<T>& L = layers_[layer];
  const int F = part_.ffn();
  const bool llama = c_.family == Family::Llama;
  T* act = grow(act_, size_t(T_) * F);
  float* scratch = grow(h_, size_t(T_) * (llama ? 2 : 1) * F);
  cuda::gemmActivation(blas_, xn, T_, c_.hidden, L.w_in.get(), F, L.b_in.get(),
                       llama ? cuda::Activation::SiluMul : cuda::Activation::Relu, scratch, act, norms.in);
  rowParallel(act, T_, F, L.w_down.get(), L.b_down.get(), x, norms.out);
}

template <class T>
void GpuEngine<T>::rowParallel(const T* in, int T_, int in_dim, const T* W, const float* bias, float* x,
                 const cuda::DeferredNorm<T>* emit) {
  const int H = c_.hidden;
  if (part_.tp == 1) return cuda::gemm(blas_, in, T_, in_dim, W, H, bias, x, true, emit);
  float* partial = grow(partial_, size_t(T_) * H);
  cuda::gemm(blas_, in, T_, in_dim, W, H, bias, partial, false);
  allReduce(partial, size_t(T_) * H);
  cuda::addInPlace(x, partial, int64_t(T_) * H);
}
