// A layer's attention in the CUDA engine (runtime/gpu_engine.cu's GpuEngine::attention, defined
// here; included by gpu_engine.cu after the class, inside its namespace: not a header to include
// elsewhere): the QKV projection and the new rows' K/V into the cache (or its stage, ring, codes),
// the attention over each head's rows, the output projection.

// x += o_proj(attention(qkv_proj(xn))), the new tokens' K/V appended to the cache first:
// at `slots` (each KV head's count before), `lengths` its count after (device arrays, from the
// step's first KV head: the current sequence's, or in a batch every sequence's); KIVI, low rank:
// its rows held in the compact form before the step at `compact`, after it one (layer, sequence,
// KV head) table further.
template <class T>
void GpuEngine<T>::attention(int layer, const T* xn, const int* d_pos, const int* slots, const int* lengths,
                             const int* compact, const Shape& shape, float* x, const Norms& norms) {
  GpuLayer<T>& L = layers_[layer];
  const int T_ = shape.rows, hd = c_.head_dim, H = part_.kv_heads, Q = part_.q_heads * hd, KV = H * hd,
            W = Q + 2 * KV;
  const bool batch = shape.batch;
  const int heads = batch ? int(seqs_.size()) * H : H;  // the step's KV heads
  const size_t head0 = batch ? 0 : size_t(current_) * H, row0 = head0 * capacity_;  // the step's first head, row
  float* qkv = grow(qkv_, size_t(T_) * W);
  // Where the new rows go in T: the cache; with a coded cache, for few queries nowhere (int8:
  // attention reads them from qkv; KIVI: kiviAppend moves them to its ring), for many a stage
  // the prefill attention reads, the cached rows dequantized in front of them; with low rank
  // always a stage (the cached rows reconstructed in front of them). An int8 cache gets them
  // quantized after RoPE; KIVI quantizes the runs that left its residual window after the
  // attention, low rank projects the rows that left its window.
  const bool coded = int8_ || kivi_;
  T *K = coded ? nullptr : L.K.get() + row0 * hd, *V = coded ? nullptr : L.V.get() + row0 * hd;
  int* k_pos = L.pos.get() + row0;
  int64_t capacity = capacity_;
  const cuda::Int8Append int8{hd, L.K8.get() + row0 * hd, L.V8.get() + row0 * hd, L.k_step.get() + row0,
                              L.v_step.get() + row0, k_pos, capacity_, qkv, W, Q, Q + KV, slots, d_pos, batch};
  const int* compact_after = compact + size_t(c_.layers) * seqs_.size() * H;
  cuda::KiviCache<T> kivi = kiviAt(layer, head0);
  kivi.quantized = compact, kivi.quantized_after = compact_after;
  const cuda::LowRankCache<T> lowrank = lowRankAt(layer, head0, compact, compact_after);
  const int longest = seq().longest;  // many rows: the current sequence's, uniform
  if (coded && shape.many) {
    capacity = longest + T_;
    K = grow(stage_k_, size_t(H) * capacity * hd), V = grow(stage_v_, size_t(H) * capacity * hd);
    k_pos = grow(stage_pos_, size_t(H) * capacity);
    if (int8_) cuda::dequantizeRows(int8, H, longest, K, V, k_pos, capacity);
    else cuda::kiviRows(kivi, H, longest, K, V, k_pos, capacity);
  }
  if (lowrank_) {  // the stage is laid out as the cache (its positions are the cache's)
    K = grow(stage_k_, size_t(heads) * capacity_ * hd), V = grow(stage_v_, size_t(heads) * capacity_ * hd);
    // A decode step's launch must not depend on the counts (a CUDA graph replays it): all the room.
    cuda::lowRankRows(blas_, lowrank, heads, shape.many ? longest : capacity_, slots, K, V);
  }
  const cuda::KvAppend<T> append{part_.q_heads, H, hd, d_pos, inv_freq_.size() ? rope_.get() : nullptr,
                                 K, V, k_pos, capacity, slots, batch};
  cuda::qkvAppend(blas_, xn, T_, c_.hidden, L.wqkv.get(), L.bqkv.get(), qkv, append, norms.in);
  if (kv_spec_.needsOutputNorms()) {  // CriticalKV: the new rows' ||W_o v||_1 per KV head, for the mirror's policy
    float* out = grow(output_norms_, size_t(c_.layers) * T_ * H) + size_t(layer) * T_ * H;
    cuda::valueOutputNorms(qkv, W, Q + KV, T_, H, part_.q_heads / H, hd, L.wo.get(), c_.hidden, Q, out);
  }
  if (kv_spec_.scoresByQueries()) {  // the mirror's policy reads the step's queries (stepQueries)
    float* q = grow(step_queries_, size_t(c_.layers) * T_ * Q) + size_t(layer) * T_ * Q;
    KVTP_CUDA_CHECK(cudaMemcpy2DAsync(q, Q * sizeof(float), qkv, W * sizeof(float), Q * sizeof(float), T_,
                                      cudaMemcpyDeviceToDevice, cudaStreamPerThread));
  }
  if (kv_spec_.think > 0 && shape.many)  // ThinK: the prompt's last `window` queries' power per channel
    cuda::queryChannelPower(qkv, W, T_, kv_spec_.window, H, part_.q_heads / H, hd,
                            grow(think_power_, size_t(c_.layers) * H * hd) + size_t(layer) * H * hd);
  if (int8_) cuda::quantizeAppend(T_, H, int8);
  if (kivi_ && !shape.many) cuda::kiviAppend(kivi, T_, H, qkv, W, Q, Q + KV, slots, d_pos, batch);
  const float scale = float(1.0 / std::sqrt(double(hd)));
  T* ctx = grow(ctx_, size_t(T_) * Q);
  // Few queries: flash-decoding over each head's rows (bounded by the capacity, so the launch is
  // the same every step); many (an uncompressed cache, every head at the same positions, head
  // 0's read): the prefill attention.
  if (!shape.many) {
    float* weights = kv_spec_.scoresDecoding() ? weights_.get() + (size_t(layer) * seqs_.size() * H + head0) * capacity_
                                               : nullptr;
    if (int8_) {
      const cuda::Int8Rows rows{L.k_step.get() + row0, L.v_step.get() + row0, qkv + Q, qkv + Q + KV, W, slots};
      cuda::attention(qkv, W, d_pos, T_, part_.q_heads, L.K8.get() + row0 * hd, L.V8.get() + row0 * hd, k_pos,
                      capacity_, H, hd, int64_t(capacity_) * hd, scale, ctx, lengths, capacity_, weights, &rows, batch);
    } else if (kivi_) {
      cuda::attention(qkv, W, d_pos, T_, part_.q_heads, kivi.K, kivi.V, k_pos, capacity_, H, hd, 0, scale, ctx,
                      lengths, capacity_, weights, nullptr, batch, &kivi);
      // The launch must not depend on the step's counts (a CUDA graph replays it): a bound on its
      // runs. Under eviction the decision goes first (settleKivi).
      if (!kivi_evicts_) cuda::kiviSettle(kivi, batch ? int(seqs_.size()) * H : H, T_ / kv_spec_.group + 2);
    } else {
      cuda::attention(qkv, W, d_pos, T_, part_.q_heads, K, V, k_pos, capacity_, H, hd, int64_t(capacity_) * hd, scale,
                      ctx, lengths, capacity_, weights, nullptr, batch);
    }
  } else {
    float* observed = shape.observe ? observed_.get() + size_t(layer) * H * observed_rows_ * observed_len_ : nullptr;
    const std::vector<int>& pos = seq().positions;
    cuda::attentionPrefill(blas_, qkv, W, d_pos, pos.data() + longest, T_, part_.q_heads, K, V, k_pos, pos.data(),
                           longest + T_, H, hd, capacity, scale, ctx, size_t(1) << 30, observed, observe_from_,
                           observed_rows_ > 1);
    if (kivi_)  // under eviction no runs yet: the rows wait in the ring for the decision
      cuda::kiviSettle(kivi, H, kivi_evicts_ ? 0 : (compactAfter(seq(), T_) - seq().compact) / kv_spec_.group, K, V,
                       k_pos, capacity, lengths, longest);
  }
  if (lowrank_) cuda::lowRankSettle(lowrank, heads, shape.many ? compactAfter(seq(), T_) - seq().compact : T_, K, V,
                                    slots, lengths);
  rowParallel(ctx, T_, Q, L.wo.get(), L.bo.get(), x, norms.out);
}
