// KIVI and low rank under eviction in the CUDA engine (runtime/gpu_engine.cu's GpuEngine, its
// members defined here; included by gpu_engine.cu after the class, inside its namespace: not a
// header to include elsewhere). The CPU evicts, then quantizes the kept rows that left the
// residual window (or projects those that left the low-rank window; kv::Policy::afterStep); the
// device does the same in that order: a step appends its rows to the ring at full precision, the
// decision compacts (cuda::kiviEvictionCompact: KIVI's runs thin and keep their key pairs while a
// row stays; low rank's coordinates move as codes without runs), then settleKivi quantizes the
// new runs or settleLowRank projects the rows past the window. A prompt waits for its decision in
// a ring of its own, sized for it; its kept rows then move to the shared ring.

// The mirror decided (kv::Policy on the host): its kept entries, matched by position to the
// device's slots as compress() matches them, become keep flags over this sequence's (layer, KV
// head, slot) table, and every kept row moves down (the mirror counts no holes).
template <class T>
void GpuEngine<T>::compactCodedAsMirror(Sequence& s) {
  const int H = part_.kv_heads, LH = c_.layers * H;
  std::vector<int> meta(2 * size_t(LH));  // table offsets, then slots
  int64_t n = 0;
  bool changed = false;
  for (int i = 0; i < LH; ++i) {
    meta[i] = int(n), meta[LH + i] = s.len[i], n += s.len[i];
    changed |= s.mirror.head(i / H, i % H).length() != s.len[i];
  }
  if (!changed) return;
  std::vector<uint8_t> keep(size_t(std::max<int64_t>(n, 1)), 0);
  for (int i = 0; i < LH; ++i)
    for (const int slot : keptSlots(s, i)) keep[size_t(meta[i]) + slot] = 1;
  int* d_meta = grow(evict_meta_, meta.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
  uint8_t* d_keep = growWithHeadroom(keep_flags_, keep.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_keep, keep.data(), keep.size(), cudaMemcpyHostToDevice));
  compactCoded(here(), deviceRows(d_meta, here()), d_keep, true);
  s.uniform = false;
}

// The KIVI or low-rank storage of the span's sequences (its first head on) compacted by the keep
// flags; the host then knows each head's slots, coded slots, kept coded entries and (KIVI) runs.
template <class T>
void GpuEngine<T>::compactCoded(Span span, const cuda::EvictionCache& rows, const uint8_t* keep, bool compact_all) {
  const int L = c_.layers, H = part_.kv_heads, LH = L * span.count * H;
  const size_t head0 = size_t(span.first) * H, hd = c_.head_dim;
  const cuda::KiviCache<T> shape = kiviShape();
  std::vector<void*> ptrs(5 * size_t(L), nullptr);  // KIVI's key pairs, value pairs, runs; ring keys, ring values
  for (int l = 0; l < L; ++l) {
    GpuLayer<T>& g = layers_[l];
    const cuda::Ring<T> ring = ringAt(l, head0);
    if (kivi_) {
      ptrs[l] = g.k_params.get() + head0 * run_capacity_ * hd;
      ptrs[L + l] = g.v_params.get() + head0 * code_capacity_ * shape.valueGroups();
      ptrs[2 * L + l] = g.k_run.get() + head0 * code_capacity_;
    }
    ptrs[3 * L + l] = ring.k, ptrs[4 * L + l] = ring.v;
  }
  const int ring_rows = ringAt(0, head0).rows;
  void** d_ptrs = uploadPointers(kivi_ptrs_, kivi_ptrs_held_, ptrs);
  int* d = grow(kivi_meta_, 6 * size_t(LH));  // coded slots, then what the compaction reports
  const std::vector<int> coded_before = spanCounts(span, &Sequence::coded);
  KVTP_CUDA_CHECK(cudaMemcpy(d, coded_before.data(), LH * sizeof(int), cudaMemcpyHostToDevice));
  // Only a head with coded rows can compact all, and only then do its ring rows need the scratch.
  const bool coded = std::any_of(coded_before.begin(), coded_before.end(), [](int c) { return c > 0; });
  const int ring_row_bytes = int(hd * sizeof(T));
  const cuda::KiviEviction k{int(hd),
                             rows.row_bytes,
                             kivi_ ? shape.valueGroups() : 0,
                             ring_rows,
                             ring_row_bytes,
                             int(sizeof(cuda::AffinePair<T>)),
                             kivi_ ? run_capacity_ : 0,
                             kivi_ ? d_ptrs : nullptr,
                             kivi_ ? d_ptrs + L : nullptr,
                             kivi_ ? reinterpret_cast<int* const*>(d_ptrs + 2 * L) : nullptr,
                             d_ptrs + 3 * L,
                             d_ptrs + 4 * L,
                             d,
                             kivi_ ? grow(run_map_, size_t(LH) * run_capacity_) : nullptr,
                             coded ? grow(ring_scratch_, size_t(LH) * ring_rows * 2 * ring_row_bytes) : nullptr};
  cuda::kiviEvictionCompact(rows, k, keep, compact_all, d + LH);
  std::vector<int> out(5 * size_t(LH));
  KVTP_CUDA_CHECK(cudaMemcpy(out.data(), d + LH, out.size() * sizeof(int), cudaMemcpyDeviceToHost));
  for (int b = 0; b < span.count; ++b) seqs_[size_t(span.first + b)].kept.resize(size_t(L) * H);
  for (int i = 0; i < LH; ++i) {
    auto [s, at] = spanHead(span, i);
    s.kept[at] = out[LH + i];
    s.len[at] = out[i], s.coded[at] = out[2 * LH + i], s.runs_alive[at] = out[3 * LH + i];
    s.coded_kept[at] = s.kept[at] - (s.len[at] - s.coded[at]);  // the ring's rows are all kept ones
    if (out[4 * LH + i]) s.next_run[at] = s.runs_alive[at];  // renumbered
  }
}

// kv::Policy::quantize after the decision: in each head the kept full-precision rows that left
// the residual window become runs of `group`, in order, the head's next run indices; then a
// prompt's rows leave its own ring.
template <class T>
void GpuEngine<T>::settleKivi(Sequence& s) {
  const int L = c_.layers, H = part_.kv_heads, LH = L * H, G = kv_spec_.group;
  std::vector<int> meta(3 * size_t(LH));  // coded slots before, after, the next run
  int most = 0;
  int64_t runs_needed = 0, coded_needed = 0;
  for (int i = 0; i < LH; ++i) {
    const int runs = std::max(0, s.len[i] - s.coded[i] - kv_spec_.residual) / G;
    meta[i] = s.coded[i], meta[LH + i] = s.coded[i] + runs * G, meta[2 * LH + i] = s.next_run[i];
    most = std::max(most, runs), runs_needed = std::max(runs_needed, int64_t(s.next_run[i]) + runs);
    coded_needed = std::max<int64_t>(coded_needed, meta[LH + i]);
  }
  if (most > 0) {
    growRuns(runs_needed);
    growCoded(coded_needed);
    int* d = grow(kivi_meta_, meta.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
    const size_t head0 = size_t(current_) * H;
    std::vector<cuda::KiviCache<T>> layers;
    for (int l = 0; l < L; ++l) {
      cuda::KiviCache<T> kivi = kiviAt(l, head0);
      kivi.quantized = d + l * H, kivi.quantized_after = d + LH + l * H, kivi.runs = d + 2 * LH + l * H;
      layers.push_back(kivi);
    }
    cuda::KiviCache<T>* d_layers = grow(kivi_layers_, layers.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d_layers, layers.data(), layers.size() * sizeof(layers[0]), cudaMemcpyHostToDevice));
    cuda::kiviSettleLayers(d_layers, L, H, most, c_.head_dim);
    for (int i = 0; i < LH; ++i) {
      const int runs = (meta[LH + i] - meta[i]) / G;
      s.coded[i] += runs * G, s.coded_kept[i] += runs * G, s.runs_alive[i] += runs, s.next_run[i] += runs;
    }
  }
  if (prompt_seq_ == current_) leavePromptRing(s);
}

// kv::Policy::project after the decision: in each head the kept full-precision rows older than
// the window (slots [coded, length - window)) become coordinates, read from the ring; then a
// prompt's rows leave its own ring.
template <class T>
void GpuEngine<T>::settleLowRank(Sequence& s) {
  const int L = c_.layers, H = part_.kv_heads, LH = L * H;
  std::vector<int> meta(3 * size_t(LH));  // coordinates before, after; slots
  int most = 0;
  for (int i = 0; i < LH; ++i) {
    const int rows = std::max(0, s.len[i] - s.coded[i] - kv_spec_.lowrank_window);
    meta[i] = s.coded[i], meta[LH + i] = s.coded[i] + rows, meta[2 * LH + i] = s.len[i];
    most = std::max(most, rows);
  }
  if (most > 0) {
    int* d = grow(kivi_meta_, meta.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
    const size_t head0 = size_t(current_) * H;
    for (int l = 0; l < L; ++l) {
      const int* lengths = d + 2 * LH + l * H;  // also each head's first new row: none goes to the ring
      cuda::lowRankSettle(lowRankAt(l, head0, d + l * H, d + LH + l * H), H, most, static_cast<const T*>(nullptr),
                          static_cast<const T*>(nullptr), lengths, lengths);
    }
    for (int i = 0; i < LH; ++i) {
      const int rows = meta[LH + i] - meta[i];
      s.coded[i] += rows, s.coded_kept[i] += rows;
    }
  }
  if (prompt_seq_ == current_) leavePromptRing(s);
}

// The most full-precision rows (slots [coded, length)) any head of s holds in its ring.
template <class T>
int GpuEngine<T>::fullRowsHeld(const Sequence& s) const {
  int held = 0;
  for (size_t i = 0; i < s.len.size(); ++i) held = std::max(held, s.len[i] - s.coded[i]);
  return held;
}

// Sequence s's coded slots, then its slots, per (layer, KV head), on the device: where each
// head's full-precision rows lie (cuda::ringResize).
template <class T>
const int* GpuEngine<T>::uploadRingRows(const Sequence& s) {
  const size_t LH = s.len.size();
  std::vector<int> meta(2 * LH);
  std::copy(s.coded.begin(), s.coded.end(), meta.begin());
  std::copy(s.len.begin(), s.len.end(), meta.begin() + LH);
  int* d = grow(kivi_meta_, meta.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
  return d;
}

// Before a step of `rows` rows of the current sequence: room for them in its ring beside the rows
// it holds there, until the decision. A prompt (more than the shared ring holds) gets a ring of
// its own, the sequence's rows already in a ring copied over (cuda::ringResize).
template <class T>
void GpuEngine<T>::ringRoom(int rows) {
  Sequence& s = seq();
  const int H = part_.kv_heads, LH = c_.layers * H, need = fullRowsHeld(s) + rows;
  if (need <= (prompt_seq_ == current_ ? prompt_rows_ : ring_)) return;
  if (prompt_seq_ >= 0 && prompt_seq_ != current_)
    throw Error("sequence " + std::to_string(prompt_seq_) + "'s prompt waits for its decision: compress it before "
                "sequence " + std::to_string(current_) + " takes a prompt");
  const size_t hd = c_.head_dim, elements = size_t(LH) * need * hd, head0 = size_t(current_) * H;
  size_t free = 0, total = 0;
  KVTP_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  const size_t bytes = 2 * elements * sizeof(T);
  if (bytes + (size_t(1) << 30) > free)
    throw Error("a prompt of " + std::to_string(need) + " tokens waits for its decision at full precision (KIVI "
                "or low rank under eviction compresses only the rows it keeps): " + std::to_string(bytes >> 20) +
                " MiB (+1 GiB headroom); the device has " + std::to_string(free >> 20) + " MiB for it");
  DeviceBuffer<T> k(elements), v(elements);  // new buffers: a decode graph captured on the old ring is not replayed
  const int* d = uploadRingRows(s);
  for (int l = 0; l < c_.layers; ++l) {
    const cuda::Ring<T> from = ringAt(l, head0);
    const size_t layer0 = size_t(l) * H * need * hd;
    cuda::ringResize(from.k, from.v, from.rows, k.get() + layer0, v.get() + layer0, need, H, int(hd * sizeof(T)),
                     d + l * H, d + LH + l * H);
  }
  prompt_ring_k_ = std::move(k), prompt_ring_v_ = std::move(v);
  prompt_rows_ = need, prompt_seq_ = current_;
}

// After a prompt's decision and runs: its full-precision rows (fewer than the shared ring holds)
// to the shared ring, and its own ring freed.
template <class T>
void GpuEngine<T>::leavePromptRing(Sequence& s) {
  const int H = part_.kv_heads, LH = c_.layers * H;
  if (fullRowsHeld(s) + kMaxFewRows > ring_) return;
  const int* d = uploadRingRows(s);
  const size_t head0 = size_t(current_) * H, hd = c_.head_dim;
  for (int l = 0; l < c_.layers; ++l) {
    const cuda::Ring<T> from = ringAt(l, head0);
    GpuLayer<T>& g = layers_[l];
    cuda::ringResize(from.k, from.v, from.rows, g.ring_k.get() + head0 * ring_ * hd, g.ring_v.get() + head0 * ring_ * hd,
                     ring_, H, int(hd * sizeof(T)), d + l * H, d + LH + l * H);
  }
  dropPromptRing();
}

// Room for `runs` key pairs per KV head (geometric), each head's pairs kept.
template <class T>
void GpuEngine<T>::growRuns(int64_t runs) {
  if (runs <= run_capacity_) return;
  const int64_t to = std::max(runs, 2 * run_capacity_);
  const size_t heads = seqs_.size() * part_.kv_heads;
  for (auto& L : layers_) regrowSpans(L.k_params, c_.head_dim, heads, run_capacity_, to, run_capacity_);
  run_capacity_ = to;
}
