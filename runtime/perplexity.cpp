#include "runtime/perplexity.h"

#include <chrono>
#include <cmath>
#include <numeric>

#include "runtime/error.h"
#include "runtime/query_filters.h"

namespace kvtp {

Mode parseMode(const std::string& s) {
  if (s == "prefill") return Mode::Prefill;
  if (s == "decode") return Mode::Decode;
  throw Error("mode '" + s + "' is not one of: prefill, decode");
}

const char* modeName(Mode m) { return m == Mode::Prefill ? "prefill" : "decode"; }

double SequenceResult::ppl() const { return tokens ? std::exp(nll / double(tokens)) : NAN; }
double PplResult::ppl() const { return tokens ? std::exp(nll / double(tokens)) : NAN; }

std::vector<Window> planWindows(const std::vector<int>& ids, int seq_len, int stride, bool drop_partial,
                                int sequence) {
  if (seq_len < 2) throw Error("seq-len must be at least 2");
  if (stride < 0) throw Error("stride must not be negative");
  std::vector<Window> out;
  const int64_t n = int64_t(ids.size());
  auto add = [&](int64_t begin, int64_t end, int score_from) {
    if (end - begin < 2 || (drop_partial && end - begin < seq_len)) return;
    out.push_back({sequence, std::vector<int>(ids.begin() + begin, ids.begin() + end), score_from});
  };
  if (stride == 0 || stride >= seq_len) {
    for (int64_t b = 0; b < n; b += seq_len) add(b, std::min(n, b + seq_len), 1);
    return out;
  }
  int64_t prev_end = 0;
  for (int64_t b = 0; b < n; b += stride) {
    const int64_t end = std::min(n, b + seq_len);
    const int64_t fresh = end - prev_end;  // tokens no earlier window scored
    add(b, end, int(std::max<int64_t>(1, (end - b) - fresh)));
    prev_end = end;
    if (end == n) break;
  }
  return out;
}

void Engine::reserve(int batch, int) {
  if (batch != 1) throw Error("this engine decodes one sequence at a time (batch " + std::to_string(batch) + " asked)");
}
void Engine::useSequence(int s) {
  if (s != 0) throw Error("this engine holds one sequence (sequence " + std::to_string(s) + " asked)");
}

namespace {

class CpuEngine : public Engine {
 public:
  CpuEngine(const Model& model, const kv::PolicySpec* spec)
      : model_(model), cache_(model.newCache()), policy_(spec ? *spec : kv::PolicySpec{}, model.headLayout(), model.group()) {
    if (policy_.spec().rank) cache_.setLowRank(model.lowRankBases(policy_.spec().rank));
    if (model.config().family == Family::Llama) cache_.setRope(ropeInverseFrequencies(model.config()));
    if (policy_.spec().method == kv::Method::QFilters)
      policy_.setQueryFilters(queryFiltersFor(policy_.spec(), model.directory(), model.config(), model.partition()));
    // What the forward pass keeps for the policy: the attention, the queries, the values' output norms.
    const kv::PolicySpec& s = policy_.spec();
    attention_.want_probabilities = s.needsAttention(), attention_.want_queries = s.needsQueries();
    attention_.want_output_norms = s.needsOutputNorms();
  }
  void startWindow() override {
    cache_.clear();
    policy_.startWindow();
  }
  std::vector<double> step(const int* tokens, const int* positions, int T, int from, int count,
                           const int* targets) override {
    const auto hidden = forward(tokens, positions, T);
    if (count == 0) return {};
    const int P = model_.config().word_embed_proj_dim;
    const std::vector<float> rows(hidden.begin() + int64_t(from) * P, hidden.begin() + int64_t(from + count) * P);
    return model_.logprobs(rows, targets, count);
  }
  std::vector<float> stepLogits(const int* tokens, const int* positions, int T) override {
    const auto hidden = forward(tokens, positions, T);
    return model_.logits(hidden.data() + int64_t(T - 1) * model_.config().word_embed_proj_dim, 1);
  }
  void compress(int last_pos, bool prefill) override { policy_.afterStep(cache_, attention_, last_pos, prefill); }
  bool compresses() const override { return policy_.spec().compresses(); }
  kv::KvBytes kvBytes(int tokens_seen) const override { return policy_.bytes(cache_, tokens_seen); }

 private:
  // The tokens through the model into the cache, keeping what the policy scores by.
  std::vector<float> forward(const int* tokens, const int* positions, int T) {
    const bool collect = attention_.want_probabilities || attention_.want_queries || attention_.want_output_norms;
    return model_.forward(tokens, positions, T, cache_, collect ? &attention_ : nullptr);
  }

  const Model& model_;
  kv::KVCache cache_;
  kv::Policy policy_;
  kv::StepAttention attention_;
};

}  // namespace

std::unique_ptr<Engine> makeCpuEngine(const Model& model, const kv::PolicySpec* policy) {
  return std::make_unique<CpuEngine>(model, policy);
}

PplResult scoreWindows(Engine& engine, const std::vector<Window>& windows, int sequences, Mode mode,
                       const ProgressFn& progress, int prefill, int batch) {
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  PplResult r;
  r.sequences.resize(sequences);
  Progress p;
  p.windows_total = int(windows.size());
  for (auto& w : windows) p.tokens_total += w.scored();

  // Counting bytes walks every cached entry, so it runs per step only when the policy can change
  // the cache; a full cache is counted once per window, at its largest.
  const bool compresses = engine.compresses();
  auto account = [&](int tokens_seen) {  // before a step's compression: the peak
    const kv::KvBytes b = engine.kvBytes(tokens_seen);
    r.kv_bytes_peak = std::max(r.kv_bytes_peak, b.stored);
    r.kv_bytes_full = std::max(r.kv_bytes_full, b.full);
  };
  auto settled = [&](int tokens_seen) {  // after it: what is held between steps
    r.kv_bytes_steady = std::max(r.kv_bytes_steady, engine.kvBytes(tokens_seen).stored);
  };
  // Decode mode takes windows `batch` at a time when they have the same length and first scored
  // token (consecutive full windows do): each is one of the engine's sequences, prefilled on its
  // own, then decoded together a token each per step. Results go to their sequences in window order.
  const bool batched = mode == Mode::Decode && batch > 1;
  for (size_t w0 = 0; w0 < windows.size();) {
    size_t w1 = w0 + 1;
    while (batched && w1 < windows.size() && int(w1 - w0) < batch && windows[w1].ids.size() == windows[w0].ids.size() &&
           windows[w1].score_from == windows[w0].score_from)
      ++w1;
    const int B = int(w1 - w0), n = int(windows[w0].ids.size()), score_from = windows[w0].score_from;
    if (batched) engine.reserve(B, n);
    std::vector<int> pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    std::vector<std::vector<double>> lps(B);  // each window's log-probs, in order
    auto record = [&](int b, const std::vector<double>& v) {
      lps[b].insert(lps[b].end(), v.begin(), v.end());
      for (double lp : v) r.nll -= lp, r.tokens += 1, p.tokens_done += 1;
      p.nll = r.nll;
    };
    auto compress = [&](int b, int last_pos, bool prefill) {  // sequence b: accounted, compressed, accounted
      engine.useSequence(b);
      if (compresses) account(last_pos + 1);
      engine.compress(last_pos, prefill);
      if (compresses) settled(last_pos + 1);
    };
    if (mode == Mode::Prefill) {
      const Window& w = windows[w0];
      engine.startWindow();
      // rows score_from-1 .. n-2 predict ids[score_from .. n-1]
      record(0, engine.step(w.ids.data(), pos.data(), n, score_from - 1, n - score_from, w.ids.data() + score_from));
    } else {
      // A prefix at once (full attention; SnapKV compresses it at its end), then token by token.
      const int first = std::clamp(prefill, 0, n - 1);
      for (int b = 0; b < B; ++b) {
        const Window& w = windows[w0 + b];
        engine.useSequence(b);
        engine.startWindow();
        if (first == 0) continue;
        const int from = std::min(score_from, first + 1);  // rows from-1 .. first-1 predict ids[from .. first]
        record(b, engine.step(w.ids.data(), pos.data(), first, from - 1, first - from + 1, w.ids.data() + from));
        compress(b, first - 1, true);  // before the next sequence's prompt: its observation is pending
      }
      std::vector<int> tokens(B), positions(B), targets(B);
      for (int i = first; i + 1 < n; ++i) {
        for (int b = 0; b < B; ++b) tokens[b] = windows[w0 + b].ids[i], positions[b] = i, targets[b] = windows[w0 + b].ids[i + 1];
        if (batched) {
          const auto v = engine.decodeBatch(tokens.data(), positions.data(), targets.data());
          for (int b = 0; b < B && i + 1 >= score_from; ++b) record(b, {v[b]});
        } else {
          record(0, engine.step(&tokens[0], &pos[i], 1, 0, i + 1 >= score_from ? 1 : 0, &targets[0]));
        }
        if (batched) {  // the batch's decisions at once (accounted as one at a time would be)
          for (int b = 0; b < B && compresses; ++b) engine.useSequence(b), account(i + 1);
          engine.compressBatch(std::vector<int>(size_t(B), i));
          for (int b = 0; b < B && compresses; ++b) engine.useSequence(b), settled(i + 1);
        } else {
          compress(0, i, false);
        }
        if (progress && (i + 1) % 64 == 0) {
          p.seconds = elapsed();
          progress(p);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      SequenceResult& s = r.sequences.at(windows[w0 + b].sequence);
      for (double lp : lps[b]) s.logprobs.push_back(lp), s.nll -= lp, s.tokens += 1;
      if (!compresses) {
        engine.useSequence(b);
        account(n - (mode == Mode::Decode ? 1 : 0));  // every token fed to the model
        settled(n - (mode == Mode::Decode ? 1 : 0));
      }
    }
    p.windows_done += B;
    p.seconds = elapsed();
    if (progress) progress(p);
    w0 = w1;
  }
  r.seconds = elapsed();
  return r;
}

}  // namespace kvtp
