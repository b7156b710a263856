// The CUDA engine's head (runtime/gpu_engine.cu's GpuEngine, its members defined here; included
// by gpu_engine.cu after the class, inside its namespace: not a header to include elsewhere): the
// final norm (and projection) of the step's hidden rows, then log-probabilities of the targets
// from vocabulary-parallel softmax partials, or the full logits gathered over the group.

template <class T>
std::vector<double> GpuEngine<T>::head(int from, int count, const int* targets) {
  if (count == 0) {
    KVTP_CUDA_CHECK(cudaDeviceSynchronize());
    collectives_.collect();
    return {};
  }
  auto out = logprobs(finalRows(from, count), count, targets);  // ends with a copy to the host: the step is complete
  collectives_.collect();
  return out;
}

template <class T>
std::vector<float> GpuEngine<T>::headLogits(int from, int count) {
  const int P = c_.word_embed_proj_dim, V = part_.vocab(), slot = vocabSlot(c_, part_.tp);
  const T* hidden = finalRows(from, count);
  const T* head = lm_head_.size() ? lm_head_.get() : embed_.get();
  // This rank's logits, then its rows padded to `slot`, then every rank's padded rows in rank order.
  float* logits = grow(logits_, size_t(count) * slot * (part_.tp + 2));
  float* mine = logits + size_t(count) * slot;
  float* all = mine + size_t(count) * slot;
  cuda::gemm(blas_, hidden, count, P, head, V, nullptr, logits, false);
  std::vector<float> host(size_t(count) * slot * part_.tp);
  if (part_.tp == 1) {
    KVTP_CUDA_CHECK(cudaMemcpy(host.data(), logits, sizeof(float) * count * V, cudaMemcpyDeviceToHost));
    collectives_.collect();
    return host;
  }
  // Rows of V into rows of `slot`, the same layout on every rank, then gathered.
  KVTP_CUDA_CHECK(cudaMemcpy2D(mine, slot * sizeof(float), logits, V * sizeof(float), V * sizeof(float), count,
                               cudaMemcpyDeviceToDevice));
  timed([&] { group_->allGather(mine, sizeof(float) * count * slot, all); });
  KVTP_CUDA_CHECK(cudaMemcpy(host.data(), all, sizeof(float) * host.size(), cudaMemcpyDeviceToHost));
  collectives_.collect();
  return joinVocabSlices(c_, part_.tp, host.data(), count, slot);
}

template <class T>
const T* GpuEngine<T>::finalRows(int from, int count) {
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
  return xn;
}

template <class T>
std::vector<double> GpuEngine<T>::logprobs(const T* hidden, int rows, const int* targets) {
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
