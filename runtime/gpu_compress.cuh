// The CUDA engine's KV compression decisions (runtime/gpu_engine.cu's GpuEngine, its members
// defined here): the host mirror's decision and the device compaction that follows it
// (compress), and the decisions taken on the device itself — the per-step methods and SCOPE's
// decode phase by the distributed select (decideOnDevice, decideDecodedOnDevice), with replicated
// KV heads' probabilities summed over the group first (sumReplicated). Included by
// gpu_engine.cu after the class, inside its namespace: not a header to include elsewhere.

// The step's decision, then (KIVI or low rank under eviction) the runs that left the residual
// window among the kept rows, or the rows that left the low-rank window, as kv::Policy::afterStep
// evicts and then quantizes or projects.
template <class T>
void GpuEngine<T>::compress(int last_pos, bool prefill) {
  if (!compresses()) return;
  Sequence& s = seq();
  s.step_rows = 0;  // int8 from here on (kvBytes)
  if (windowed_ && !windowed_evicts_) {  // the step converted on the device what the CPU converts here: now it counts
    s.compact_counted = s.compact;
    return;
  }
  phaseEnds(nullptr);
  decide(s, last_pos, prefill);
  if (kivi_evicts_) settleKivi(s);
  else if (windowed_evicts_) settleLowRank(s);
  phaseEnds(windowed_evicts_ ? "settle" : "decide");
}

// A batch's decode step decided at once: every sequence's entries in one table, one select over
// their pools (each sequence's budgets its own), one compaction, where one decision a sequence
// paid its fixed work B times (8 x ~0.75 ms a step at 8 x 32k). Each sequence's keys, budgets and
// ties are its own, so it keeps what it keeps decided alone (BatchedDecodeMatchesOneSequenceAtATime).
// The rest — a prompt pending, the first decode step after a block-wise prompt (Scissorhands'
// bits come from the mirror), replicated heads, the methods with per-head inputs or rows on the host — one at a time.
template <class T>
bool GpuEngine<T>::decidesBatchTogether() const {
  using M = kv::Method;
  const M m = kv_spec_.method;
  // (Q-Filters' filters are laid out by one sequence's heads; LagKV, CUR, chunks and evict_below stay
  // one at a time: not yet tested over a batch.)
  const bool batchable = m == M::H2O || m == M::Scissorhands || m == M::StreamingLLM || m == M::TOVA ||
                         m == M::Random || m == M::KNorm || m == M::KeyDiff;
  if (!device_decides_ || device_decides_decoded_ || !batchable || host_forms_ || lowrank_ || seqs_.size() < 2 ||
      prompt_seq_ >= 0 || observed_len_ > 0 || part_.tp > c_.kv_heads || kv_spec_.chunk > 1 ||
      kv_spec_.evict_below > -INFINITY)
    return false;
  const Sequence& first = seqs_[0];
  return std::all_of(seqs_.begin(), seqs_.end(), [&](const Sequence& s) {
    return s.on_device && s.unscored == first.unscored && s.weights_pending == first.weights_pending;
  });
}

template <class T>
void GpuEngine<T>::compressBatch(const std::vector<int>& last_positions) {
  const int B = int(seqs_.size());
  if (int(last_positions.size()) != B)
    throw Error("compressBatch: " + std::to_string(last_positions.size()) + " positions for a batch of " +
                std::to_string(B));
  if (!compresses() || !decidesBatchTogether()) return Engine::compressBatch(last_positions);
  phaseEnds(nullptr);
  std::vector<bool> decides;  // (interval=: alike in a batch decoded together, one at a time otherwise)
  for (int b = 0; b < B; ++b) {
    Sequence& s = seqs_[size_t(b)];
    s.step_rows = 0;
    s.policy.countStep(last_positions[b], false);
    decides.push_back(s.policy.decidesAfter(false));
  }
  if (std::count(decides.begin(), decides.end(), decides[0]) == B) {
    decideOnDevice({0, B}, last_positions, nullptr, decides[0]);
  } else {
    for (int b = 0; b < B; ++b) decideOnDevice({b, 1}, {last_positions[b]}, nullptr, decides[b]);
  }
  if (kivi_evicts_) {  // each sequence's new runs
    const int was = current_;
    for (current_ = 0; current_ < B; ++current_) settleKivi(seqs_[size_t(current_)]);
    current_ = was;
  }
  phaseEnds(kivi_evicts_ ? "settle" : "decide");
}

// On the device (decideOnDevice): the per-step methods' every decision, and the prompt of
// SnapKV and PyramidKV (from the prefill's observation window; a one-row prompt, which the device
// does not observe, on the mirror), then SCOPE's decode phase or nothing. Block-wise prompts and
// what mirrorDecidesAll names on the mirror: it decides (scored by the prefill's observation
// window when it asks for attention), and each head's kept entries are a subsequence of what it
// held, so matching positions gives the rows the device keeps.
template <class T>
void GpuEngine<T>::decide(Sequence& s, int last_pos, bool prefill) {
  const bool once = kv_spec_.promptOnce(), observed = observed_len_ > 0 && observed_seq_ == current_;
  const bool mirror_prompt = kv_spec_.block > 0 || (once && !observed);
  if (prefill && once && s.on_device)
    throw Error(kv_spec_.describe() + " decides a window's prompt once, and this window's was decided: a new prompt "
                "takes a new window");
  if (!prefill && once && device_decides_decoded_) return decideDecodedOnDevice(s, last_pos);
  if (!prefill && once && s.on_device) {  // after SnapKV's or PyramidKV's prompt
    s.policy.countStep(last_pos, false);
    return keepUndecided(s);
  }
  if (device_decides_ && (prefill ? s.on_device || !mirror_prompt : !once)) {
    s.policy.countStep(last_pos, prefill);
    decideOnDevice(here(), {last_pos}, nullptr, s.policy.decidesAfter(prefill));
    if (prefill) s.prompt_kept = s.kept;  // (SCOPE's decode phase keeps it)
    return;
  }
  s.unscored = 0;
  const int H = part_.kv_heads, LH = c_.layers * H;
  attention_.T = 0;
  attention_.blocks.assign(size_t(LH), {});
  if (observed_len_ > 0 && observed_seq_ == current_) {  // the prefill's observed rows (summed unless observed_rows_ > 1)
    const size_t block = size_t(observed_rows_) * observed_len_;
    std::vector<float> all(size_t(LH) * block);
    KVTP_CUDA_CHECK(cudaMemcpy(all.data(), observed_.get(), all.size() * sizeof(float), cudaMemcpyDeviceToHost));
    attention_.T = observed_rows_;
    for (int i = 0; i < LH; ++i) attention_.blocks[i].assign(all.begin() + i * block, all.begin() + (i + 1) * block);
    observed_len_ = 0;
  } else if (s.weights_pending) {  // a decode step's probabilities: weights_ [layer][sequence][KV head][capacity]
    std::vector<float> all(size_t(LH) * s.longest);
    cudaMemcpy3DParms copy{};
    const size_t row = s.longest * sizeof(float);
    copy.srcPtr = make_cudaPitchedPtr(weights_.get() + size_t(current_) * H * capacity_, capacity_ * sizeof(float),
                                      row, seqs_.size() * H);
    copy.dstPtr = make_cudaPitchedPtr(all.data(), row, row, H);
    copy.extent = make_cudaExtent(row, H, c_.layers);
    copy.kind = cudaMemcpyDeviceToHost;
    if (row > 0) KVTP_CUDA_CHECK(cudaMemcpy3D(&copy));
    attention_.T = 1;
    for (int i = 0; i < LH; ++i)
      attention_.blocks[i].assign(all.begin() + int64_t(i) * s.longest, all.begin() + int64_t(i) * s.longest + s.len[i]);
    s.weights_pending = false;
  }
  attention_.output_norms.clear();
  if (kv_spec_.needsOutputNorms()) {  // CriticalKV: the step's rows of this sequence
    const int rows = last_step_.rows;
    const auto [first, count] = lastStepRows();
    std::vector<float> all(size_t(c_.layers) * rows * H);
    KVTP_CUDA_CHECK(cudaMemcpy(all.data(), output_norms_.get(), all.size() * sizeof(float), cudaMemcpyDeviceToHost));
    attention_.output_norms.assign(size_t(LH), {});
    for (int i = 0; i < LH; ++i)
      for (int t = first; t < first + count; ++t)
        attention_.output_norms[i].push_back(all[(size_t(i / H) * rows + t) * H + i % H]);
  }
  // (noncausal's and compactor's decode steps read neither rows nor queries: they decided once, at
  // the prompt.)
  const bool decides_by_rows = mirrorReadsRows(kv_spec_) && (prefill || !kv_spec_.promptOnce());
  attention_.queries.clear();
  if (decides_by_rows && kv_spec_.scoresByQueries())
    attention_.queries = stepQueries(s), attention_.T = lastStepRows().count;
  if (decides_by_rows && !host_forms_) copyRowsToMirror(s);  // (a mirror of host_forms_ holds its rows)
  std::vector<std::vector<std::pair<int32_t, kv::Form>>> forms;  // host_forms_: each head's before the decision
  if (host_forms_)
    for (int i = 0; i < LH; ++i) {
      const kv::HeadCache& c = s.mirror.head(i / H, i % H);
      auto& f = forms.emplace_back();
      for (int e = 0; e < c.length(); ++e) f.emplace_back(c.positions[e], c.form[e]);
    }
  s.policy.afterStep(s.mirror, attention_, last_pos, prefill);
  if (windowed_evicts_) compactCodedAsMirror(s);
  else compactAsMirror(s);
  if (host_forms_) writeConverted(s, forms);
  s.longest = *std::max_element(s.len.begin(), s.len.end());
  if (device_decides_decoded_ && prefill) s.prompt_kept = s.len;
  if (kv_spec_.think > 0 && prefill) pruneKeyChannels(s);
}

// ThinK at the prompt's end (kv::Policy::pruneKeyChannels, after its decision): the prefill left
// each KV head's query power per channel; a replicated head's is summed over the ranks holding
// its query heads first, as the CPU sums it; then the device ranks and zeroes each head's channels.
template <class T>
void GpuEngine<T>::pruneKeyChannels(Sequence& s) {
  const int L = c_.layers, H = part_.kv_heads, LH = L * H, hd = c_.head_dim;
  if (part_.tp > c_.kv_heads) {
    std::vector<float> all(size_t(LH) * hd);
    KVTP_CUDA_CHECK(cudaMemcpy(all.data(), think_power_.get(), all.size() * sizeof(float), cudaMemcpyDeviceToHost));
    s.policy.sumOverReplicas(all, hd);
    KVTP_CUDA_CHECK(cudaMemcpy(think_power_.get(), all.data(), all.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  std::vector<int> meta(2 * size_t(LH), 0);  // table offsets (unused), then slots
  std::copy(s.len.begin(), s.len.end(), meta.begin() + LH);
  int* d_meta = grow(evict_meta_, meta.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
  cuda::pruneKeyChannels(deviceRows(d_meta, here()), think_power_.get(), int(kv_spec_.think * hd));
}

// The methods the device does not score (mirrorReadsRows): every head's rows of sequence s as the
// device holds them (int8 and KIVI decoded as the CPU decodes them: cuda::cachedRows; low rank's
// coordinates reconstructed: lowRankRowsToHost), held by the mirror for this decision.
// O(entries) copied each decision: what interval= is for on long contexts.
template <class T>
void GpuEngine<T>::copyRowsToMirror(Sequence& s) {
  const int H = part_.kv_heads, LH = c_.layers * H, hd = c_.head_dim;
  std::vector<int> meta(2 * size_t(LH));  // table offsets, then slots
  int64_t n = 0;
  for (int i = 0; i < LH; ++i) {
    if (s.mirror.head(i / H, i % H).length() != s.len[i])
      throw std::logic_error("copyRowsToMirror: the mirror does not follow the device's slots");
    meta[i] = int(n), meta[LH + i] = s.len[i], n += s.len[i];
  }
  if (n > INT32_MAX) throw Error("a decision on the host: more than 2^31 cache entries on one GPU");
  const size_t floats = size_t(n) * hd;
  std::vector<float> host(2 * floats);
  if (lowrank_) {
    lowRankRowsToHost(s, meta, host.data(), host.data() + floats);
  } else {
    int* d_meta = grow(evict_meta_, meta.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
    float* rows = growWithHeadroom(mirror_rows_, std::max<size_t>(2 * floats, 1));
    cuda::cachedRows(deviceRows(d_meta, here()), hd, rows, rows + floats);
    KVTP_CUDA_CHECK(cudaMemcpy(host.data(), rows, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
  for (int i = 0; i < LH; ++i)
    s.mirror.holdRows(i / H, i % H, host.data() + size_t(meta[i]) * hd, host.data() + floats + size_t(meta[i]) * hd);
}

// hostHoldsForms: the step's new rows as the device cached them (each stepped head's rows from its
// first free slot, as run() uploaded the slots), widened to float and appended to each stepped
// sequence's mirror, which holds every entry's values and converts them as the CPU does.
template <class T>
void GpuEngine<T>::appendStepRows(const int* positions, int rows, bool batch) {
  const int B = int(seqs_.size()), H = part_.kv_heads, hd = c_.head_dim, steps = batch ? B : 1, per = batch ? 1 : rows;
  const size_t heads = size_t(steps) * H, head0 = batch ? 0 : size_t(current_) * H, floats = heads * per * hd;
  float* k = grow(new_rows_, 2 * floats);
  std::vector<float> host(2 * floats), keys(size_t(per) * H * hd), values(keys.size());
  for (int l = 0; l < c_.layers; ++l) {
    // meta_: the step's positions (`rows` of them), then the first free slot per (layer, sequence, KV head)
    const int* slots = meta_.get() + rows + (size_t(l) * B + head0 / H) * H;
    GpuLayer<T>& L = layers_[l];
    cuda::readNewRows(L.K.get() + head0 * capacity_ * hd, L.V.get() + head0 * capacity_ * hd, capacity_, int(heads), hd,
                      slots, per, k, k + floats);
    KVTP_CUDA_CHECK(cudaMemcpy(host.data(), k, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (int b = 0; b < steps; ++b) {  // (heads, per, hd) -> the mirror's (per, H x hd)
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < per; ++t) {
          const size_t from = ((size_t(b) * H + h) * per + t) * hd, to = (size_t(t) * H + h) * hd;
          std::copy_n(host.data() + from, hd, keys.data() + to);
          std::copy_n(host.data() + floats + from, hd, values.data() + to);
        }
      Sequence& s = batch ? seqs_[b] : seq();
      s.mirror.append(l, keys.data(), values.data(), positions + (batch ? b : 0), per);
    }
  }
}

// hostHoldsForms, after the mirror's decision and the compaction (each head's entries at slots 0,
// 1, ... on both): every entry whose form the decision changed (matched by position with `forms`,
// the head's before it; a new row was full) written back at its slot decoded, as the CPU's
// attention reads it.
template <class T>
void GpuEngine<T>::writeConverted(Sequence& s, const std::vector<std::vector<std::pair<int32_t, kv::Form>>>& forms) {
  const int H = part_.kv_heads, hd = c_.head_dim;
  const size_t head0 = size_t(current_) * H;
  for (int l = 0; l < c_.layers; ++l) {
    std::vector<int64_t> at;
    std::vector<float> keys, values;
    for (int h = 0; h < H; ++h) {
      const kv::HeadCache& c = s.mirror.head(l, h);
      const auto& before = forms[size_t(l) * H + h];
      std::vector<int> changed;
      size_t j = 0;
      for (int e = 0; e < c.length(); ++e) {
        while (j < before.size() && before[j].first != c.positions[e]) ++j;
        if (c.form[e] != (j < before.size() ? before[j].second : kv::Form::Full)) changed.push_back(e);
      }
      if (changed.empty()) continue;
      const size_t n = keys.size();
      keys.resize(n + changed.size() * hd), values.resize(keys.size());
      s.mirror.decodeEntries(l, h, changed, keys.data() + n, values.data() + n);
      for (const int e : changed) at.push_back(int64_t(head0 + h) * capacity_ + e);
    }
    if (at.empty()) continue;
    float* d = grow(new_rows_, 2 * keys.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d, keys.data(), keys.size() * sizeof(float), cudaMemcpyHostToDevice));
    KVTP_CUDA_CHECK(cudaMemcpy(d + keys.size(), values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice));
    int64_t* d_at = grow(converted_at_, at.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d_at, at.data(), at.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
    cuda::writeRows(layers_[l].K.get(), layers_[l].V.get(), hd, d_at, int(at.size()), d, d + keys.size());
  }
}

// Low rank's rows as the CPU's KVCache::rows gives them: each layer's heads reconstructed into the
// stage as a step reads them (cuda::lowRankRows: coordinates times the bases, keys rotated; the
// ring's rows copied), then widened to float at row meta[head] of keys and values (meta: table
// offsets, then slots, per (layer, KV head)). The stage is free between steps and as large as one
// (a decode graph captured on it stays valid).
template <class T>
void GpuEngine<T>::lowRankRowsToHost(const Sequence& s, const std::vector<int>& meta, float* keys, float* values) {
  const int H = part_.kv_heads, LH = c_.layers * H, hd = c_.head_dim;
  const size_t head0 = size_t(current_) * H;
  T* K = grow(stage_k_, size_t(H) * capacity_ * hd);
  T* V = grow(stage_v_, size_t(H) * capacity_ * hd);
  const int* d = uploadRingRows(s);  // coordinates, then slots, per (layer, KV head)
  std::vector<T> k, v;
  for (int l = 0; l < c_.layers; ++l) {
    const int longest = *std::max_element(s.len.begin() + size_t(l) * H, s.len.begin() + size_t(l + 1) * H);
    if (longest == 0) continue;
    cuda::lowRankRows(blas_, lowRankAt(l, head0, d + l * H, d + l * H), H, longest, d + LH + l * H, K, V);
    const size_t row = size_t(hd) * sizeof(T), width = size_t(longest) * row;
    k.resize(size_t(H) * longest * hd), v.resize(k.size());
    KVTP_CUDA_CHECK(cudaMemcpy2D(k.data(), width, K, capacity_ * row, width, H, cudaMemcpyDeviceToHost));
    KVTP_CUDA_CHECK(cudaMemcpy2D(v.data(), width, V, capacity_ * row, width, H, cudaMemcpyDeviceToHost));
    for (int h = 0; h < H; ++h) {
      const int i = l * H + h;
      for (size_t e = 0; e < size_t(meta[LH + i]) * hd; ++e) {
        keys[size_t(meta[i]) * hd + e] = cuda::toFloat(k[size_t(h) * longest * hd + e]);
        values[size_t(meta[i]) * hd + e] = cuda::toFloat(v[size_t(h) * longest * hd + e]);
      }
    }
  }
}

// The last step's queries of sequence s for the mirror's policy (kv::StepAttention::queries: per
// (layer, KV head) its query heads' rows, each (rows, head_dim), before RoPE — the device's, after
// it, rotated back by their positions).
template <class T>
std::vector<std::vector<float>> GpuEngine<T>::stepQueries(const Sequence& s) {
  const int L = c_.layers, H = part_.kv_heads, hd = c_.head_dim, Q = part_.q_heads * hd, rows = last_step_.rows;
  const auto [first, count] = lastStepRows();
  std::vector<float> all(size_t(L) * rows * Q);
  KVTP_CUDA_CHECK(cudaMemcpy(all.data(), step_queries_.get(), all.size() * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<int> back(s.positions.end() - count, s.positions.end());
  for (int& p : back) p = -p;
  const std::vector<float>& inv_freq = s.mirror.ropeInvFreq();
  std::vector<std::vector<float>> out(size_t(L) * H);
  for (int l = 0; l < L; ++l) {
    float* q = all.data() + (size_t(l) * rows + first) * Q;
    if (!inv_freq.empty()) kernels::applyRope(q, count, part_.q_heads, hd, back.data(), inv_freq.data());
    for (int h = 0; h < part_.q_heads; ++h) {
      std::vector<float>& block = out[size_t(l) * H + part_.kvHeadOf(h, c_)];
      for (int t = 0; t < count; ++t) block.insert(block.end(), q + size_t(t) * Q + h * hd, q + size_t(t) * Q + (h + 1) * hd);
    }
  }
  return out;
}

// The mirror's kept entries, matched by position to the device's rows, kept on the device too:
// each head's rows move down in order (cuda::compactKV), layer by layer where a head changed.
template <class T>
void GpuEngine<T>::compactAsMirror(Sequence& s) {
  const int H = part_.kv_heads;
  const size_t head0 = size_t(current_) * H;  // the sequence's first KV head in the device cache
  for (int l = 0; l < c_.layers; ++l) {
    bool changed = false;
    for (int h = 0; h < H; ++h) changed |= s.mirror.head(l, h).length() != s.len[size_t(l) * H + h];
    if (!changed) continue;
    int max_kept = 0;
    for (int h = 0; h < H; ++h) max_kept = std::max(max_kept, s.mirror.head(l, h).length());
    std::vector<int> keep(size_t(H) * max_kept + H, 0);  // rows per head, then counts
    for (int h = 0; h < H; ++h) {
      const std::vector<int> slots = keptSlots(s, l * H + h);
      std::copy(slots.begin(), slots.end(), keep.begin() + size_t(h) * max_kept);
      keep[size_t(H) * max_kept + h] = s.len[size_t(l) * H + h] = int(slots.size());
    }
    int* d_keep = growWithHeadroom(keep_, keep.size());
    KVTP_CUDA_CHECK(cudaMemcpy(d_keep, keep.data(), keep.size() * sizeof(int), cudaMemcpyHostToDevice));
    GpuLayer<T>& L = layers_[l];
    const int* kept = d_keep + size_t(H) * max_kept;
    const size_t rows = head0 * capacity_;
    if (int8_) {
      cuda::compactKV(L.K8.get() + rows * c_.head_dim, L.V8.get() + rows * c_.head_dim, L.pos.get() + rows,
                      capacity_, H, c_.head_dim, d_keep, kept, max_kept);
      cuda::compactKV(L.k_step.get() + rows, L.v_step.get() + rows, nullptr, capacity_, H, 1, d_keep, kept, max_kept);
    } else {
      cuda::compactKV(L.K.get() + rows * c_.head_dim, L.V.get() + rows * c_.head_dim, L.pos.get() + rows, capacity_,
                      H, c_.head_dim, d_keep, kept, max_kept);
    }
    s.uniform = false;
  }
}

// SCOPE's decode phase on the device (kv::Policy::evictDecoded's rule): the prompt's entries
// and the newest decoded ones are protected, each head's other decoded entries compete in a
// pool of their own by this step's attention, the head keeping its prompt and the phase's
// budget. A step that does not compress (discontinuous) just counts its rows as kept.
template <class T>
void GpuEngine<T>::decideDecodedOnDevice(Sequence& s, int last_pos) {
  s.policy.countStep(last_pos, false);
  const kv::Policy::DecodedBudget b = s.policy.decodedBudget();
  if (b.decides) return decideOnDevice(here(), {last_pos}, &b);
  keepUndecided(s);
}

template <class T>
void GpuEngine<T>::keepUndecided(Sequence& s) {
  if (s.on_device) {
    for (int& k : s.kept) k += s.unscored;
  } else {  // the mirror compacted the prompt: every slot holds an entry
    s.kept = s.len, s.on_device = true;
  }
  s.unscored = 0, s.weights_pending = false;
}

// Eviction decided on the device (cuda/eviction.h): kv::Policy's decision, by the same select
// over this rank's heads with the pools' histograms summed over NCCL (kv/budget_select.h), to
// the same budgets, so every rank keeps what tp 1 keeps. The prompt too, from the prefill's
// observed rows: H2O's summed, Scissorhands' a history bit each (cuda::promptHistory), SnapKV's
// and PyramidKV's window summed and max-pooled (a block-wise prompt decided on the mirror: its
// bits go to the device). From the first decision here on, the device holds the scores and the
// mirror rests (kvBytes counts the kept entries). Evicted slots stay as holes until compaction
// pays (cuda::evictionCompact).
template <class T>
void GpuEngine<T>::decideOnDevice(Span span, const std::vector<int>& last_positions,
                                  const kv::Policy::DecodedBudget* decoded, bool decides) {
  const int L = c_.layers, H = part_.kv_heads, B = span.count, BH = B * H, LH = L * BH;
  std::vector<Sequence*> in_span;
  for (int b = 0; b < B; ++b) in_span.push_back(&seqs_[size_t(span.first + b)]);
  // Between layers of score_ / history_ / weights_; the span's first row (head 0, slot 0).
  const size_t stride = seqs_.size() * H * size_t(capacity_), head0 = size_t(span.first) * H * capacity_;
  const bool h2o = kv_spec_.method == kv::Method::H2O, scissorhands = kv_spec_.method == kv::Method::Scissorhands;
  // The prefill's observed rows, [layer][kv_head][observed_rows_][observed_len_] (a span of one).
  const bool observed = observed_len_ > 0 && observed_seq_ == span.first;
  for (int b = 0; b < B; ++b) {
    Sequence& s = *in_span[b];
    if (s.on_device || !scissorhands || s.longest == 0 || observed) continue;
    std::vector<uint64_t> bits(size_t(H) * s.longest);  // a block-wise prompt's bits, decided on the mirror
    const size_t row = s.longest * sizeof(uint64_t), first = head0 + size_t(b) * H * capacity_;
    for (int l = 0; l < L; ++l) {
      for (int h = 0; h < H; ++h) {
        const kv::HeadCache& c = s.mirror.head(l, h);
        std::copy(c.history.begin(), c.history.end(), bits.begin() + size_t(h) * s.longest);
      }
      KVTP_CUDA_CHECK(cudaMemcpy2D(history_.get() + l * stride + first, capacity_ * sizeof(uint64_t), bits.data(), row,
                                   row, H, cudaMemcpyHostToDevice));
    }
  }
  phaseEnds("bits");
  std::vector<char> was_on_device(in_span.size());
  for (int b = 0; b < B; ++b) {
    was_on_device[b] = in_span[b]->on_device;
    in_span[b]->on_device = true;
  }
  // This rank's table: its heads' entries in (layer, sequence, KV head, position) order, each
  // head's first entry at off[head].
  std::vector<int64_t> off(size_t(LH) + 1, 0);
  const std::vector<int> lengths = spanCounts(span, &Sequence::len);
  for (int i = 0; i < LH; ++i) off[i + 1] = off[i] + lengths[i];
  const int64_t N = off.back();
  if (N > INT32_MAX) throw Error("eviction on the device: more than 2^31 cache entries on one GPU");
  // Device: table offsets, slots, then slots and entries after, per (layer, head); each head's
  // table head — its sequence's (layer, global KV head) — every table head's pool (kv::Policy's
  // pools over every rank, a sequence's after the one before), and (a batch) each head's last
  // position. SCOPE's decode phase: a pool per head, keeping its prompt and the phase's budget.
  const int G = c_.kv_heads, LG = L * G, pools_each = decoded ? LG : in_span[0]->policy.poolCount(),
            heads_per_pool = LG / pools_each, pools = B * pools_each;
  std::vector<int> meta(5 * size_t(LH) + size_t(B) * LG + (B > 1 ? LH : 0));
  for (int i = 0; i < LH; ++i) {
    const int b = i % BH / H;
    meta[i] = int(off[i]), meta[LH + i] = lengths[i];
    meta[4 * LH + i] = b * LG + (i / BH) * G + part_.kv_head_begin + i % H;
    if (B > 1) meta[5 * LH + size_t(B) * LG + i] = last_positions[b];
  }
  for (int t = 0; t < B * LG; ++t) meta[5 * LH + t] = t / LG * pools_each + t % LG / heads_per_pool;
  int* d_meta = grow(evict_meta_, meta.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
  std::vector<int64_t> budget;
  for (int b = 0; b < B; ++b) {
    const std::vector<int64_t> mine = decoded ? std::vector<int64_t>(size_t(pools_each), 0)
                                              : in_span[b]->policy.budgets(last_positions[b]);
    budget.insert(budget.end(), mine.begin(), mine.end());
  }
  if (decoded)  // (a span of one)
    for (int i = 0; i < LH; ++i) budget[meta[4 * LH + i]] = in_span[0]->prompt_kept[i] + decoded->per_head;
  int64_t* d_budget = grow(evict_budget_, budget.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_budget, budget.data(), budget.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  phaseEnds("layout");
  cuda::EvictionCache cache = deviceRows(d_meta, span);
  phaseEnds("rows");
  // What the step's attention left: a decode step's probabilities, or the prompt's observed rows
  // (H2O's every row and SnapKV's window summed, Scissorhands' last `history` rows apart).
  const int64_t observation = int64_t(observed_rows_) * observed_len_;
  const float* weights = observed ? observed_.get() : in_span[0]->weights_pending ? weights_.get() + head0 : nullptr;
  int64_t weights_layer = observed ? H * observation : int64_t(stride), weights_head = observed ? observation : capacity_;
  if (weights && part_.tp > c_.kv_heads)  // (a span of one)
    weights = sumReplicated(weights, weights_layer, weights_head, observed ? observation : in_span[0]->longest);
  cache.score = h2o ? score_.get() + head0 : nullptr, cache.history = scissorhands ? history_.get() + head0 : nullptr;
  cache.weights = weights, cache.weights_layer = weights_layer, cache.weights_head = weights_head;
  int fresh = in_span[0]->unscored;
  if (observed && scissorhands) {  // the prompt's bits, then keyed as they stand
    cuda::promptHistory(cache, fresh, observed_rows_, observed_len_);
    cache.weights = nullptr, fresh = 0;
  }
  if (observed) observed_len_ = 0;
  double* table = growWithHeadroom(table_, size_t(std::max<int64_t>(N, 1)));
  const uint64_t mask = kv_spec_.history >= 64 ? ~0ull : (1ull << kv_spec_.history) - 1;
  // TOVA and SCOPE's decode phase score by this step's attention alone (TOVA's prompt: its last row).
  const cuda::EvictScore method = decoded || kv_spec_.method == kv::Method::TOVA ? cuda::EvictScore::StepAttention
                                  : h2o          ? cuda::EvictScore::H2O
                                  : scissorhands ? cuda::EvictScore::Scissorhands
                                  : kv_spec_.method == kv::Method::KNorm ? cuda::EvictScore::KeyNorm
                                  : kv_spec_.method == kv::Method::KeyDiff ? cuda::EvictScore::KeyDiff
                                  : kv_spec_.method == kv::Method::QFilters ? cuda::EvictScore::QueryFilter
                                  : kv_spec_.method == kv::Method::Random ? cuda::EvictScore::Random
                                  : kv_spec_.method == kv::Method::LagKV  ? cuda::EvictScore::Lag
                                  : kv_spec_.method == kv::Method::CUR    ? cuda::EvictScore::CUR
                                  : kv_spec_.method == kv::Method::SnapKV || kv_spec_.method == kv::Method::PyramidKV
                                      ? cuda::EvictScore::SnapKV
                                                                          : cuda::EvictScore::StreamingLLM;
  // Protected: the sinks and the recent window; in SCOPE's phase the prompt and the newest decoded.
  const int protect_below = decoded ? decoded->prefill_end : kv_spec_.sinks,
            protect_recent = decoded ? kv_spec_.decode_recent : kv_spec_.recent;
  cuda::ScoreInputs inputs{kv_spec_.seed, d_meta + 4 * LH, G, query_filters_.get()};
  const bool sums_rows = method == cuda::EvictScore::Lag || method == cuda::EvictScore::CUR;
  if (sums_rows) {
    inputs.lag = kv_spec_.lag, inputs.local = kv_spec_.local;
    inputs.row_sums = growWithHeadroom(row_sums_, 4 * size_t(std::max<int64_t>(N, 1)));
  }
  if (!decoded) inputs.chunk = kv_spec_.chunk, inputs.pool = kv_spec_.kernel;
  if (sums_rows || inputs.chunk > 1)
    inputs.entry_slots = growWithHeadroom(entry_slots_, size_t(std::max<int64_t>(N, 1)));
  if (B > 1) inputs.last_positions = d_meta + 5 * LH + size_t(B) * LG;
  cuda::evictionKeys(cache, method, fresh, mask, protect_below, protect_recent, last_positions[0], table, inputs);
  phaseEnds("keys");
  if (!decides) {  // interval=: the step's attention is scored; the decision waits for its step
    for (int b = 0; b < B; ++b) {
      in_span[b]->on_device = was_on_device[b];
      keepUndecided(*in_span[b]);
    }
    return;
  }
  // The pools span ranks unless each is one head (kv/budget_select.h): then the sums are local.
  const bool shared = part_.tp > 1 && !decoded && kv_spec_.scope != kv::Scope::Head;
  const cuda::SelectLayout select{d_meta + 4 * LH, d_meta + 5 * LH, d_budget, B * LG, pools,
                                  !shared || headLayout(c_, part_).owner};
  std::function<void(double*, size_t)> sum_over_ranks;
  if (shared) sum_over_ranks = [this](double* d, size_t n) { group_->allReduceSum(d, n); };
  uint8_t* keep = growWithHeadroom(keep_flags_, size_t(std::max<int64_t>(N, 1)));
  cuda::evictionDecide(cache, table, select, sum_over_ranks, keep);
  if (kv_spec_.evict_below > -INFINITY && !decoded) cuda::evictBelow(table, N, kv_spec_.evict_below, keep);
  phaseEnds("select");
  if (kivi_) {
    compactCoded(span, cache, keep, false);
  } else {
    cuda::evictionCompact(cache, keep, d_meta + 2 * LH, d_meta + 3 * LH);
    KVTP_CUDA_CHECK(cudaMemcpy(meta.data(), d_meta + 2 * LH, 2 * LH * sizeof(int), cudaMemcpyDeviceToHost));
    for (int b = 0; b < B; ++b) in_span[b]->kept.resize(size_t(L) * H);
    for (int i = 0; i < LH; ++i) {
      auto [s, at] = spanHead(span, i);
      s.len[at] = meta[i], s.kept[at] = meta[LH + i];
    }
  }
  for (int b = 0; b < B; ++b) {
    Sequence& s = *in_span[b];
    s.longest = *std::max_element(s.len.begin(), s.len.end());
    s.uniform = false, s.unscored = 0, s.weights_pending = false;
  }
  phaseEnds("compact");
}

// The sequence's rows for the device decision: per layer its K and V rows (int8 codes, KIVI's
// codes), positions and int8 steps at its first head, and KIVI's key pairs, runs, ring and coded
// slots (the key-scored methods decode its keys); the table's offsets and slots per (layer, KV
// head) from d_offsets_lengths. Scores, history and probabilities are the caller's to set.
template <class T>
cuda::EvictionCache GpuEngine<T>::deviceRows(const int* d_offsets_lengths, Span span) {
  const int L = c_.layers, H = part_.kv_heads, BH = span.count * H, LH = L * BH;
  const size_t hd = c_.head_dim, first_head = size_t(span.first) * H, head0 = first_head * capacity_,
               code0 = first_head * code_capacity_;  // KIVI's coded rows
  const int row_bytes = kivi_     ? kiviShape().codeBytes()
                        : lowrank_ ? int(2 * kv_spec_.rank * sizeof(T))
                                   : int(hd * (int8_ ? 1 : sizeof(T)));
  // K, V, positions, key steps, value steps; KIVI: key pairs, value pairs, runs, ring keys, ring values.
  std::vector<void*> ptrs(10 * size_t(L), nullptr);
  for (int l = 0; l < L; ++l) {
    GpuLayer<T>& g = layers_[l];
    // Low rank: its coordinates (key then value) are the K rows, with no V rows.
    ptrs[l] = kivi_     ? static_cast<void*>(g.Kq.get() + code0 * row_bytes)
              : lowrank_ ? static_cast<void*>(g.coords.get() + head0 * 2 * kv_spec_.rank)
              : int8_    ? static_cast<void*>(g.K8.get() + head0 * hd)
                         : g.K.get() + head0 * hd;
    ptrs[L + l] = kivi_     ? static_cast<void*>(g.Vq.get() + code0 * row_bytes)
                  : lowrank_ ? nullptr
                  : int8_    ? static_cast<void*>(g.V8.get() + head0 * hd)
                             : g.V.get() + head0 * hd;
    ptrs[2 * L + l] = g.pos.get() + head0;
    if (int8_) ptrs[3 * L + l] = g.k_step.get() + head0, ptrs[4 * L + l] = g.v_step.get() + head0;
    if (kivi_) {
      const cuda::KiviCache<T> kivi = kiviAt(l, first_head);
      ptrs[5 * L + l] = kivi.k_params, ptrs[6 * L + l] = kivi.v_params, ptrs[7 * L + l] = kivi.run;
      ptrs[8 * L + l] = kivi.ring.k, ptrs[9 * L + l] = kivi.ring.v;
    }
  }
  void** d_ptrs = uploadPointers(evict_ptrs_, evict_ptrs_held_, ptrs);
  const cuda::KeyFormat element_format = std::is_same_v<T, float>         ? cuda::KeyFormat::F32
                                         : std::is_same_v<T, __nv_bfloat16> ? cuda::KeyFormat::BF16
                                                                            : cuda::KeyFormat::F16;
  const cuda::KeyFormat key_format = int8_ ? cuda::KeyFormat::Int8 : kivi_ ? cuda::KeyFormat::Kivi : element_format;
  cuda::KiviRows kivi{};
  if (kivi_) {
    const cuda::KiviCache<T> shape = kiviAt(0, first_head);
    kivi = {int(hd),
            shape.bits,
            shape.group,
            shape.ring.rows,
            element_format,
            shape.keyGroups(),
            d_ptrs + 5 * L,
            d_ptrs + 6 * L,
            reinterpret_cast<const int* const*>(d_ptrs + 7 * L),
            d_ptrs + 8 * L,
            d_ptrs + 9 * L,
            nullptr};
    int* coded = grow(evict_coded_, size_t(LH));
    const std::vector<int> coded_slots = spanCounts(span, &Sequence::coded);
    KVTP_CUDA_CHECK(cudaMemcpy(coded, coded_slots.data(), LH * sizeof(int), cudaMemcpyHostToDevice));
    kivi.coded = coded;
  }
  return {L, BH, capacity_, row_bytes, key_format, d_ptrs, d_ptrs + L,
          reinterpret_cast<int* const*>(d_ptrs + 2 * L), int8_ ? reinterpret_cast<float* const*>(d_ptrs + 3 * L) : nullptr,
          int8_ ? reinterpret_cast<float* const*>(d_ptrs + 4 * L) : nullptr, nullptr, nullptr,
          int64_t(seqs_.size()) * part_.kv_heads * capacity_, nullptr, 0, 0, d_offsets_lengths + LH, d_offsets_lengths,
          kivi, kivi_ ? code_capacity_ : 0};
}

// A replicated KV head (kv_heads < tp) sees only this rank's query heads: its probabilities are
// summed over the ranks that hold it before they score, as kv::Policy::score does on the host.
// Laid out by (layer, global KV head), so that the ranks holding other heads add nothing to it;
// the strides become the sum's.
template <class T>
const float* GpuEngine<T>::sumReplicated(const float* w, int64_t& layer_stride, int64_t& head_stride, int n) {
  const int L = c_.layers, G = c_.kv_heads;
  const size_t size = size_t(L) * G * n;
  float* all = growWithHeadroom(replicated_weights_, std::max<size_t>(size, 1));
  KVTP_CUDA_CHECK(cudaMemsetAsync(all, 0, size * sizeof(float), cudaStreamPerThread));
  for (int h = 0; h < part_.kv_heads; ++h)
    KVTP_CUDA_CHECK(cudaMemcpy2DAsync(all + size_t(part_.kv_head_begin + h) * n, size_t(G) * n * sizeof(float),
                                      w + h * head_stride, layer_stride * sizeof(float), n * sizeof(float), L,
                                      cudaMemcpyDeviceToDevice, cudaStreamPerThread));
  group_->allReduceSum(all, size);
  layer_stride = int64_t(G) * n, head_stride = n;
  return all + size_t(part_.kv_head_begin) * n;
}
