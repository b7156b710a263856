// The CUDA engine's steps (runtime/gpu_engine.cu's GpuEngine, its members defined here; included
// by gpu_engine.cu after the class, inside its namespace: not a header to include elsewhere): the
// tokens of one sequence, or one token of each sequence of a batch, admitted into the host's
// bookkeeping; the step's upload of positions and cache slots; the device work it runs (a decode
// step replayed as a CUDA graph).

// `rows` new tokens of the current sequence through the model and into its cache.
template <class T>
void GpuEngine<T>::advance(const int* tokens, const int* positions, int rows) {
  checkTokens(c_, tokens, positions, rows);
  Sequence& s = seq();
  // The policy scores by attention: several tokens go through the prefill path, which leaves
  // the probabilities of the rows it observes (even for a short prompt); one token through
  // flash-decoding, which leaves its own when a policy evicts during decoding.
  const kv::PolicySpec& spec = kv_spec_;
  const bool observe = spec.needsAttention() && rows > 1;
  if (observe) {
    if (observed_len_ > 0 && observed_seq_ != current_)
      throw Error("sequence " + std::to_string(observed_seq_) + "'s prompt observation is still pending: compress it "
                  "before sequence " + std::to_string(current_) + " takes a prompt");
    // H2O sums every row; Scissorhands keeps a bit per row for its last `history` rows (earlier
    // bits would age out of its mask anyway); SnapKV / PyramidKV sum their observation window;
    // Finch weighs each of its window's rows by its position, so keeps them apart.
    const bool finch = spec.method == kv::Method::Finch;
    observed_rows_ = spec.method == kv::Method::Scissorhands ? std::min(rows, std::min(spec.history, 64))
                     : finch                                 ? std::min(rows, spec.window)
                                                             : 1;
    observe_from_ = spec.method == kv::Method::H2O    ? 0
                    : spec.method == kv::Method::TOVA || spec.method == kv::Method::SimLayerKV ? rows - 1
                    : spec.method == kv::Method::Scissorhands || finch ? rows - observed_rows_
                                                                       : rows - spec.window;
  }
  const bool many = rows > kMaxFewRows || observe;
  if (many && !s.uniform)
    throw Error("the CUDA engine scores several tokens at once only over an uncompressed cache; a compressed "
                "window goes on token by token");
  makeRoom(s.longest + rows);
  if (windowed_evicts_) ringRoom(rows);
  admit(s, positions, rows);
  if (observe) {
    observed_len_ = s.longest + rows, observed_seq_ = current_;
    const size_t n = size_t(c_.layers) * part_.kv_heads * observed_rows_ * observed_len_;
    KVTP_CUDA_CHECK(cudaMemset(grow(observed_, n), 0, n * sizeof(float)));
  }
  run(tokens, positions, Shape{rows, many, observe, false});
  if (host_forms_) appendStepRows(positions, rows, false);
  cached(s, rows);
}

// One new token of each of the batch's sequences through the model and into its cache.
template <class T>
void GpuEngine<T>::advanceBatch(const int* tokens, const int* positions) {
  const int B = int(seqs_.size());
  checkTokens(c_, tokens, positions, B);
  int need = 0;
  for (auto& s : seqs_) need = std::max(need, s.longest + 1);
  for (int b = 0; b < B; ++b) {  // every position checked before any sequence changes
    const std::vector<int>& seen = seqs_[b].positions;
    if (!seen.empty() && positions[b] <= seen.back())
      throw Error("decodeBatch: sequence " + std::to_string(b) + " is at position " + std::to_string(seen.back()) +
                  "; its next token cannot be at " + std::to_string(positions[b]));
  }
  if (windowed_evicts_ && prompt_seq_ >= 0)
    throw Error("sequence " + std::to_string(prompt_seq_) + "'s prompt waits for its decision: compress it before a "
                "batch step");
  makeRoom(need);
  for (int b = 0; b < B; ++b) admit(seqs_[b], positions + b, 1);
  run(tokens, positions, Shape{B, false, false, true});
  if (host_forms_) appendStepRows(positions, B, true);
  for (auto& s : seqs_) cached(s, 1);
}

// Sequence s takes `rows` new tokens at `positions` (the step that appends them follows): its
// positions, the mirror the host policy decides on, whether the step leaves probabilities.
template <class T>
void GpuEngine<T>::admit(Sequence& s, const int* positions, int rows) {
  s.weights_pending = rows == 1 && kv_spec_.scoresDecoding();
  s.positions.insert(s.positions.end(), positions, positions + rows);
  s.unscored += rows, s.step_rows = rows;
  if (compresses() && (!windowed_ || windowed_evicts_) && !s.on_device) {
    if (!host_forms_)  // (a mirror holding the rows gets them after the step: appendStepRows)
      for (int l = 0; l < c_.layers; ++l) s.mirror.append(l, nullptr, nullptr, positions, rows);
    for (auto& p : s.row_positions) p.insert(p.end(), positions, positions + rows);
  }
}

// The step ran: its rows are cached in every head of s.
template <class T>
void GpuEngine<T>::cached(Sequence& s, int rows) {
  if (windowed_ && !windowed_evicts_) s.compact = compactAfter(s, rows);
  for (int& n : s.len) n += rows;
  s.longest += rows;
}

// Uploads the step's tokens and cache bookkeeping, then runs the model's device work (a one-row
// step replays a CUDA graph).
template <class T>
void GpuEngine<T>::run(const int* tokens, const int* positions, const Shape& shape) {
  const int rows = shape.rows;
  last_step_ = shape;
  int* d_tokens = grow(tokens_, rows);
  KVTP_CUDA_CHECK(cudaMemcpy(d_tokens, tokens, sizeof(int) * rows, cudaMemcpyHostToDevice));
  // One upload: the new tokens' positions, then each (layer, sequence, KV head)'s first free
  // slot, then its count after the step; KIVI, low rank: its compact rows before the step, then
  // after it (under eviction KIVI quantizes after the decision: the same).
  const int B = int(seqs_.size()), H = part_.kv_heads;
  const size_t LBH = size_t(c_.layers) * B * H;
  std::vector<int> meta(positions, positions + rows);
  meta.resize(size_t(rows) + 4 * LBH);
  int* slots = meta.data() + rows;
  int* after = slots + size_t(c_.layers) * B * H;
  for (int l = 0; l < c_.layers; ++l)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const size_t i = (size_t(l) * B + b) * H + h;
        slots[i] = after[i] = seqs_[b].len[size_t(l) * H + h];
        if (shape.batch || b == current_) after[i] += shape.batch ? 1 : rows;
      }
  int* compact = after + LBH;
  for (int l = 0; l < c_.layers; ++l)
    for (int b = 0; b < B; ++b) {
      const Sequence& s = seqs_[b];
      const bool stepped = shape.batch || b == current_;
      const int then = stepped ? compactAfter(s, shape.batch ? 1 : rows) : s.compact;
      for (int h = 0; h < H; ++h) {
        const size_t i = (size_t(l) * B + b) * H + h;
        compact[i] = windowed_evicts_ ? s.coded[size_t(l) * H + h] : s.compact;
        compact[LBH + i] = windowed_evicts_ ? compact[i] : then;
      }
    }
  int* d_meta = grow(meta_, meta.size());
  KVTP_CUDA_CHECK(cudaMemcpy(d_meta, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
  if (kv_spec_.scoresDecoding()) grow(weights_, size_t(c_.layers) * B * H * capacity_);  // before any capture
  // The device work of the step reads only device buffers and this step's shape; a decode step
  // (one token a sequence) replays it as a CUDA graph (captured at the second step of the same
  // capacity and sequence).
  auto launches = [&] { forward(d_tokens, d_meta, shape); };
  if (rows == 1 || shape.batch) {
    cuda::GraphReplay& graph = shape.batch ? batch_graph_ : decode_graph_;
    const int64_t key = (int64_t(capacity_) * (kMaxBatch + 1) + B) * (kMaxBatch + 1) + (shape.batch ? 0 : current_);
    if (graph.run(key, launches)) collectives_.replayed(graph_marks_[shape.batch]);
    else graph_marks_[shape.batch] = collectives_.marks();
  } else {
    launches();
  }
}
