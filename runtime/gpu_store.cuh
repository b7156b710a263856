// The CUDA engine's KV store (runtime/gpu_engine.cu's GpuEngine, its members defined here;
// included by gpu_engine.cu after the class, inside its namespace: not a header to include
// elsewhere): the bytes a cached row takes in each form (fp16/bf16/fp32, int8, KIVI, low rank),
// the bytes a sequence's cache holds as the CPU counts them (kvBytes), the room a batch needs,
// geometric growth keeping what is cached, and where a layer's KIVI codes and full-precision ring
// sit.

template <class T>
size_t GpuEngine<T>::rowBytes() const {
  const bool state = kv_spec_.method == kv::Method::H2O || kv_spec_.method == kv::Method::Scissorhands;
  const size_t decision = device_decides_ && state ? 8 : 0;  // H2O's score or Scissorhands' bits
  const size_t hd = c_.head_dim;
  const cuda::KiviCache<T> kivi = kiviShape();
  const size_t rows = int8_   ? 2 * (hd + sizeof(float))
                      : kivi_ ? 2 * kivi.codeBytes() + sizeof(cuda::AffinePair<T>) * (kivi.valueGroups() + hd / kivi.group + 1) +
                                  (kivi_evicts_ ? sizeof(int) : 0)
                      : lowrank_ ? 2 * kv_spec_.rank * sizeof(T)
                                 : 2 * hd * sizeof(T);
  return decision + rows + sizeof(int);
}

template <class T>
size_t GpuEngine<T>::cacheBytes(size_t batch, int64_t tokens) const {
  const size_t heads = batch * part_.kv_heads, stage = lowrank_ ? 2 * size_t(c_.head_dim) * sizeof(T) : 0;
  return heads * (c_.layers * (tokens * rowBytes() + headBytes()) + tokens * stage);
}

template <class T>
void GpuEngine<T>::checkRoom(int batch, int64_t tokens) {
  const size_t need = cacheBytes(batch, tokens), held = cacheBytes(seqs_.size(), capacity_);
  size_t free = 0, total = 0;
  KVTP_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  constexpr size_t kHeadroom = size_t(1) << 30;  // activations, workspaces, the decode probabilities
  if (need + kHeadroom > free + held)
    throw Error("a KV cache of " + std::to_string(batch) + " x " + std::to_string(tokens) + " tokens needs " +
                std::to_string(need >> 20) + " MiB (+1 GiB headroom); the device has " +
                std::to_string((free + held) >> 20) + " MiB for it");
}

template <class T>
void GpuEngine<T>::growTo(int64_t cap) {
  if (cap <= capacity_) return;
  checkRoom(int(seqs_.size()), cap);
  int longest = 0;
  for (auto& s : seqs_) longest = std::max(longest, s.longest);
  const size_t heads = seqs_.size() * part_.kv_heads;
  // Each head's rows (and positions) move to the start of its new, longer span; `per`: how
  // many rows a span of c tokens has (KIVI's key pairs: one per run of `group`).
  auto regrow = [&](auto& buf, size_t width, size_t spans = 0, std::function<int64_t(int64_t)> per = {}) {
    using E = typename std::remove_reference_t<decltype(buf)>::value_type;
    if (!spans) spans = heads;
    auto rows = [&](int64_t c) { return per ? per(c) : c; };
    std::remove_reference_t<decltype(buf)> bigger(spans * rows(cap) * width);
    const size_t row = width * sizeof(E);
    if (longest > 0)
      KVTP_CUDA_CHECK(cudaMemcpy2D(bigger.get(), rows(cap) * row, buf.get(), rows(capacity_) * row,
                                   rows(longest) * row, spans, cudaMemcpyDeviceToDevice));
    buf = std::move(bigger);
  };
  // The device decision's per-entry state, [layer][sequence][kv_head][capacity].
  if (kv_spec_.method == kv::Method::H2O && device_decides_) regrow(score_, 1, c_.layers * heads);
  if (kv_spec_.method == kv::Method::Scissorhands && device_decides_) regrow(history_, 1, c_.layers * heads);
  for (auto& L : layers_) {
    if (int8_) {
      regrow(L.K8, c_.head_dim);
      regrow(L.V8, c_.head_dim);
      regrow(L.k_step, 1);
      regrow(L.v_step, 1);
    } else if (kivi_) {
      const cuda::KiviCache<T> kivi = kiviShape();
      regrow(L.Kq, kivi.codeBytes());
      regrow(L.Vq, kivi.codeBytes());
      if (kivi_evicts_) regrow(L.k_run, 1);  // the key pairs: growRuns
      else regrow(L.k_params, size_t(c_.head_dim), 0, [&](int64_t c) { return kiviShape(c).keyGroups(); });
      regrow(L.v_params, size_t(kivi.valueGroups()));
    } else if (lowrank_) {
      regrow(L.coords, 2 * size_t(kv_spec_.rank));
    } else {
      regrow(L.K, c_.head_dim);
      regrow(L.V, c_.head_dim);
    }
    regrow(L.pos, 1);
    if (windowed_ && L.ring_k.size() != heads * ring_ * c_.head_dim)
      L.ring_k = DeviceBuffer<T>(heads * ring_ * c_.head_dim), L.ring_v = DeviceBuffer<T>(heads * ring_ * c_.head_dim);
  }
  capacity_ = int(cap);
  if (kivi_evicts_) growRuns(cap / kv_spec_.group + 1);
}

template <class T>
cuda::KiviCache<T> GpuEngine<T>::kiviAt(int l, size_t head0) {
  GpuLayer<T>& L = layers_[l];
  cuda::KiviCache<T> kivi = kiviShape(capacity_);
  const size_t row0 = head0 * capacity_, hd = c_.head_dim;
  kivi.K = L.Kq.get() + row0 * kivi.codeBytes(), kivi.V = L.Vq.get() + row0 * kivi.codeBytes();
  kivi.k_params = L.k_params.get() + head0 * kivi.keyGroups() * hd;
  kivi.v_params = L.v_params.get() + row0 * kivi.valueGroups();
  kivi.ring = ringAt(l, head0);
  kivi.k_pos = L.pos.get() + row0;
  if (kivi_evicts_) kivi.run = L.k_run.get() + row0;
  return kivi;
}

// Layer l's low-rank cache from KV head head0 on, with the given per-head counts of rows held as
// coordinates before and after the step (device arrays).
template <class T>
cuda::LowRankCache<T> GpuEngine<T>::lowRankAt(int l, size_t head0, const int* projected, const int* projected_after) {
  GpuLayer<T>& L = layers_[l];
  const size_t row0 = head0 * capacity_;
  return {c_.head_dim,      kv_spec_.rank,  part_.kv_heads,
          L.coords.get() + row0 * 2 * kv_spec_.rank,
          L.key_basis.get(), L.value_basis.get(), inv_freq_.size() ? inv_freq_.get() : nullptr,
          ringAt(l, head0),  L.pos.get() + row0, capacity_,
          projected,         projected_after, kv_spec_.quant == kv::Quant::Int8};
}

template <class T>
cuda::Ring<T> GpuEngine<T>::ringAt(int l, size_t head0) {
  const size_t hd = c_.head_dim;
  if (prompt_seq_ >= 0 && head0 == size_t(prompt_seq_) * part_.kv_heads) {
    const size_t layer0 = size_t(l) * part_.kv_heads * prompt_rows_ * hd;
    return {prompt_ring_k_.get() + layer0, prompt_ring_v_.get() + layer0, prompt_rows_, int(hd)};
  }
  GpuLayer<T>& L = layers_[l];
  return {L.ring_k.get() + head0 * ring_ * hd, L.ring_v.get() + head0 * ring_ * hd, ring_, int(hd)};
}

template <class T>
kv::KvBytes GpuEngine<T>::kvBytes(int tokens_seen) const {
  const Sequence& s = seqs_[current_];
  const int64_t full = kv::fullCacheBytes(tokens_seen, c_.layers, part_.kv_heads, c_.head_dim);  // docs/KV.md
  // kv::Policy::bytes of the cache the mirror would hold (kv::KVCache::storedBytes).
  const kv::StoreShape store{c_.head_dim, kv_spec_.bits, kv_spec_.group, kv_spec_.rank};
  // The rows in a ring: int8 under low rank but the step's own until its compress() (as kv::Policy quantizes).
  auto ringBytes = [&](int rows) {
    if (!lowrank_ || kv_spec_.quant != kv::Quant::Int8) return store.bytes(kv::Form::Full, rows);
    const int fresh = std::min(rows, s.step_rows);
    return store.bytes(kv::Form::Full, fresh) + store.bytes(kv::Form::Int8, rows - fresh);
  };
  if (windowed_evicts_) {  // per head: the ring's rows, the kept coded ones (in KIVI's runs), a position each
    int64_t bytes = 0;
    for (size_t i = 0; i < s.len.size(); ++i) {
      const int ring_rows = s.len[i] - s.coded[i];
      bytes += ringBytes(ring_rows) +
               (kivi_ ? store.bytes(kv::Form::Kivi, s.coded_kept[i], s.runs_alive[i])
                      : store.bytes(kv::Form::LowRank, s.coded_kept[i])) +
               4 * int64_t(ring_rows + s.coded_kept[i]);
    }
    return {bytes, full};
  }
  if (s.on_device) {  // rows since the last decision still full, then int8; a position each
    int64_t bytes = 0;
    for (int k : s.kept)
      bytes += store.bytes(int8_ ? kv::Form::Int8 : kv::Form::Full, k) + store.bytes(kv::Form::Full, s.unscored) +
               4 * int64_t(k + s.unscored);
    return {bytes, full};
  }
  if (windowed_) {  // full rows, then codes or coordinates
    const int64_t c = s.compact_counted;
    const kv::Form form = kivi_ ? kv::Form::Kivi : kv::Form::LowRank;
    int64_t bytes = 0;
    for (int n : s.len) bytes += ringBytes(n - c) + store.bytes(form, c, kivi_ ? c / kv_spec_.group : 0);
    return {bytes, full};
  }
  if (compresses()) return s.policy.bytes(s.mirror, tokens_seen);
  return {full, full};
}
