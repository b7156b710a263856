#include "runtime/perplexity.h"

#include <chrono>
#include <cmath>
#include <numeric>

#include "runtime/error.h"

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
  }
  void startWindow() override {
    cache_.clear();
    policy_.startWindow();
  }
  std::vector<double> step(const int* tokens, const int* positions, int T, int from, int count,
                           const int* targets) override {
    const auto hidden = model_.forward(tokens, positions, T, cache_, policy_.spec().needsAttention() ? &attention_ : nullptr);
    if (count == 0) return {};
    const int P = model_.config().word_embed_proj_dim;
    const std::vector<float> rows(hidden.begin() + int64_t(from) * P, hidden.begin() + int64_t(from + count) * P);
    return model_.logprobs(rows, targets, count);
  }
  void compress(int last_pos, bool prefill) override { policy_.afterStep(cache_, attention_, last_pos, prefill); }
  bool compresses() const override { return policy_.spec().compresses(); }
  kv::KvBytes kvBytes(int tokens_seen) const override { return policy_.bytes(cache_, tokens_seen); }

 private:
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
                       const ProgressFn& progress, int prefill) {
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
  for (const Window& w : windows) {
    const int n = int(w.ids.size());
    SequenceResult& s = r.sequences.at(w.sequence);
    engine.startWindow();
    std::vector<int> pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    auto record = [&](const std::vector<double>& lps) {
      for (double lp : lps) {
        s.logprobs.push_back(lp);
        s.nll -= lp;
        s.tokens += 1;
        r.nll -= lp;
        r.tokens += 1;
        p.tokens_done += 1;
      }
      p.nll = r.nll;
    };
    if (mode == Mode::Prefill) {
      // rows score_from-1 .. n-2 predict ids[score_from .. n-1]
      record(engine.step(w.ids.data(), pos.data(), n, w.score_from - 1, n - w.score_from, w.ids.data() + w.score_from));
    } else {
      // A prefix at once (full attention; SnapKV compresses it at its end), then token by token.
      const int first = std::clamp(prefill, 0, n - 1);
      if (first > 0) {
        const int from = std::min(w.score_from, first + 1);  // rows from-1 .. first-1 predict ids[from .. first]
        record(engine.step(w.ids.data(), pos.data(), first, from - 1, first - from + 1, w.ids.data() + from));
        if (compresses) account(first);
        engine.compress(first - 1, true);
        if (compresses) settled(first);
      }
      for (int i = first; i + 1 < n; ++i) {
        record(engine.step(&w.ids[i], &pos[i], 1, 0, i + 1 >= w.score_from ? 1 : 0, &w.ids[i + 1]));
        if (compresses) account(i + 1);
        engine.compress(i, false);
        if (compresses) settled(i + 1);
        if (progress && (i + 1) % 64 == 0) {
          p.seconds = elapsed();
          progress(p);
        }
      }
    }
    if (!compresses) {
      account(n - (mode == Mode::Decode ? 1 : 0));  // every token fed to the model
      settled(n - (mode == Mode::Decode ? 1 : 0));
    }
    p.windows_done += 1;
    p.seconds = elapsed();
    if (progress) progress(p);
  }
  r.seconds = elapsed();
  return r;
}

}  // namespace kvtp
