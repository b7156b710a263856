// The CUDA engine's KV store (runtime/gpu_engine.cu's GpuEngine, its members defined here;
// included by gpu_engine.cu after the class, inside its namespace: not a header to include
// elsewhere): the bytes a cached row takes in each form (fp16/bf16/fp32, int8, KIVI, low rank),
// the bytes a sequence's cache holds as the CPU counts them (kvBytes), the room a batch needs,
// geometric growth keeping what is cached, and where a layer's KIVI codes and full-precision ring
// sit.

// buf's `spans` spans of `from` rows (`width` elements a row) moved to the starts of spans of `to`
// rows, the first `used` rows of each kept.
template <class E>
void regrowSpans(DeviceBuffer<E>& buf, size_t width, size_t spans, int64_t from, int64_t to, int64_t used) {
  DeviceBuffer<E> bigger(spans * to * width);
  const size_t row = width * sizeof(E);
  if (used > 0)
    KVTP_CUDA_CHECK(cudaMemcpy2D(bigger.get(), to * row, buf.get(), from * row, used * row, spans,
                                 cudaMemcpyDeviceToDevice));
  buf = std::move(bigger);
}

template <class T>
size_t GpuEngine<T>::rowBytes() const {
  const bool state = kv_spec_.method == kv::Method::H2O || kv_spec_.method == kv::Method::Scissorhands;
  const size_t decision = device_decides_ && state ? 8 : 0;  // H2O's score or Scissorhands' bits
  const size_t hd = c_.head_dim;
  const size_t rows = int8_                   ? 2 * (hd + sizeof(float))
                      : kivi_ && !kivi_evicts_ ? codedRowBytes()
                      : kivi_                  ? 0  // its coded rows: growCoded
                      : lowrank_               ? 2 * kv_spec_.rank * sizeof(T)
                                               : 2 * hd * sizeof(T);
  return decision + rows + sizeof(int);
}

template <class T>
size_t GpuEngine<T>::codedRowBytes() const {
  const cuda::KiviCache<T> kivi = kiviShape();
  return 2 * kivi.codeBytes() + sizeof(cuda::AffinePair<T>) * (kivi.valueGroups() + c_.head_dim / kivi.group + 1) +
         (kivi_evicts_ ? sizeof(int) : 0);
}

template <class T>
size_t GpuEngine<T>::cacheBytes(size_t batch, int64_t tokens, int64_t coded_rows) const {
  const size_t heads = batch * part_.kv_heads, stage = lowrank_ ? 2 * size_t(c_.head_dim) * sizeof(T) : 0;
  const size_t coded = kivi_evicts_ ? coded_rows * codedRowBytes() : 0;
  return heads * (c_.layers * (tokens * rowBytes() + headBytes() + coded) + tokens * stage);
}

template <class T>
void GpuEngine<T>::checkRoom(int batch, int64_t tokens) {
  const size_t need = cacheBytes(batch, tokens), held = cacheBytes(seqs_.size(), capacity_, code_capacity_);
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
    auto rows = [&](int64_t c) { return per ? per(c) : c; };
    regrowSpans(buf, width, spans ? spans : heads, rows(capacity_), rows(cap), longest > 0 ? rows(longest) : 0);
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
      if (!kivi_evicts_) {  // under eviction the coded rows grow apart (growCoded)
        const cuda::KiviCache<T> kivi = kiviShape();
        regrow(L.Kq, kivi.codeBytes());
        regrow(L.Vq, kivi.codeBytes());
        regrow(L.k_params, size_t(c_.head_dim), 0, [&](int64_t c) { return kiviShape(c).keyGroups(); });
        regrow(L.v_params, size_t(kivi.valueGroups()));
      }
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
  if (kivi_ && !kivi_evicts_) code_capacity_ = cap;
  if (kivi_evicts_) growRuns(cap / kv_spec_.group + 1);
}

// KIVI under eviction: room for `rows` coded rows per KV head, each head's kept. The coded rows
// are the bulk of such a cache and only the kept ones are ever coded (a prompt waits for its
// decision at full precision), so they are sized by what the heads hold, not by the slots
// (capacity_): under a 20 % budget about a fifth of the bytes where the heads keep alike. Grown
// by a quarter at least (doubling would give back much of what eviction saved).
template <class T>
void GpuEngine<T>::growCoded(int64_t rows) {
  if (rows <= code_capacity_) return;
  const int64_t to = std::max(rows, code_capacity_ + code_capacity_ / 4);
  const size_t heads = seqs_.size() * part_.kv_heads, row = codedRowBytes();
  const size_t bytes = c_.layers * heads * to * row, held = c_.layers * heads * code_capacity_ * row;
  size_t free = 0, total = 0;
  KVTP_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  // A layer at a time, its old rows freed as its new ones come: one layer's old ones held besides.
  if (bytes - held + held / c_.layers + (size_t(1) << 30) > free)
    throw Error("KIVI's kept rows need " + std::to_string(to) + " coded rows per KV head for " +
                std::to_string(seqs_.size()) + " sequences: " + std::to_string(bytes >> 20) +
                " MiB (+1 GiB headroom); the device has " + std::to_string(free >> 20) + " MiB for it");
  int64_t used = 0;
  for (const Sequence& s : seqs_) used = std::max<int64_t>(used, *std::max_element(s.coded.begin(), s.coded.end()));
  const cuda::KiviCache<T> kivi = kiviShape();
  for (auto& L : layers_) {
    regrowSpans(L.Kq, kivi.codeBytes(), heads, code_capacity_, to, used);
    regrowSpans(L.Vq, kivi.codeBytes(), heads, code_capacity_, to, used);
    regrowSpans(L.v_params, kivi.valueGroups(), heads, code_capacity_, to, used);
    regrowSpans(L.k_run, 1, heads, code_capacity_, to, used);
  }
  code_capacity_ = to;
}

template <class T>
cuda::KiviCache<T> GpuEngine<T>::kiviAt(int l, size_t head0) {
  GpuLayer<T>& L = layers_[l];
  cuda::KiviCache<T> kivi = kiviShape(code_capacity_);
  const size_t row0 = head0 * code_capacity_, hd = c_.head_dim;
  kivi.K = L.Kq.get() + row0 * kivi.codeBytes(), kivi.V = L.Vq.get() + row0 * kivi.codeBytes();
  kivi.k_params = L.k_params.get() + head0 * kivi.keyGroups() * hd;
  kivi.v_params = L.v_params.get() + row0 * kivi.valueGroups();
  kivi.ring = ringAt(l, head0);
  kivi.k_pos = L.pos.get() + head0 * capacity_, kivi.pos_capacity = capacity_;
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
