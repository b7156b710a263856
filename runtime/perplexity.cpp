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

PplResult scoreWindows(const Model& model, const std::vector<Window>& windows, int sequences, Mode mode,
                       const ProgressFn& progress, const DecodeOptions& decode) {
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  PplResult r;
  r.sequences.resize(sequences);
  Progress p;
  p.windows_total = int(windows.size());
  for (auto& w : windows) p.tokens_total += w.scored();

  kv::KVCache cache = model.newCache();
  const kv::PolicySpec full_spec;
  kv::Policy policy(decode.policy ? *decode.policy : full_spec, model.headLayout(), model.group());
  if (policy.spec().rank) policy.setLowRank(model.lowRankBases(policy.spec().rank));
  kv::StepAttention attention;
  kv::StepAttention* collect = policy.spec().needsAttention() ? &attention : nullptr;
  // Counting bytes walks every cached entry, so it runs per step only when the policy can change
  // the cache; a full cache is counted once per window, at its largest.
  const bool compresses = policy.spec().compresses();
  auto account = [&](int tokens_seen) {  // before a step's compression: the peak
    const kv::KvBytes b = policy.bytes(cache, tokens_seen);
    r.kv_bytes_peak = std::max(r.kv_bytes_peak, b.stored);
    r.kv_bytes_full = std::max(r.kv_bytes_full, b.full);
  };
  auto settled = [&](int tokens_seen) {  // after it: what is held between steps
    r.kv_bytes_steady = std::max(r.kv_bytes_steady, policy.bytes(cache, tokens_seen).stored);
  };
  for (const Window& w : windows) {
    const int n = int(w.ids.size());
    SequenceResult& s = r.sequences.at(w.sequence);
    cache.clear();
    policy.startWindow();
    std::vector<int> pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    auto record = [&](double lp) {
      s.logprobs.push_back(lp);
      s.nll -= lp;
      s.tokens += 1;
      r.nll -= lp;
      r.tokens += 1;
      p.tokens_done += 1;
      p.nll = r.nll;
    };
    if (mode == Mode::Prefill) {
      const auto hidden = model.forward(w.ids.data(), pos.data(), n, cache);
      // rows score_from-1 .. n-2 predict ids[score_from .. n-1]
      const int first = w.score_from - 1, rows = n - w.score_from;
      const int P = model.config().word_embed_proj_dim;
      std::vector<float> h(hidden.begin() + int64_t(first) * P, hidden.begin() + int64_t(first + rows) * P);
      for (double lp : model.logprobs(h, w.ids.data() + w.score_from, rows)) record(lp);
    } else {
      // A prefix at once (full attention; SnapKV compresses it at its end), then token by token.
      const int first = std::clamp(decode.prefill, 0, n - 1);
      if (first > 0) {
        const auto hidden = model.forward(w.ids.data(), pos.data(), first, cache, collect);
        const int P = model.config().word_embed_proj_dim, from = std::min(w.score_from, first + 1);
        std::vector<float> h(hidden.begin() + int64_t(from - 1) * P, hidden.begin() + int64_t(first) * P);
        for (double lp : model.logprobs(h, w.ids.data() + from, first - from + 1)) record(lp);
        if (compresses) account(first);
        policy.afterStep(cache, attention, first - 1, true);
        if (compresses) settled(first);
      }
      for (int i = first; i + 1 < n; ++i) {
        const auto hidden = model.forward(&w.ids[i], &pos[i], 1, cache, collect);
        if (i + 1 >= w.score_from) record(model.logprobs(hidden, &w.ids[i + 1], 1)[0]);
        if (compresses) account(i + 1);
        policy.afterStep(cache, attention, i, false);
        if (compresses) settled(i + 1);
        if (progress && (i + 1) % 64 == 0) {
          p.seconds = elapsed();
          progress(p);
        }
      }
    }
    if (!compresses) {
      const int held = cache.head(0, 0).length();  // every token fed to the model
      account(held);
      settled(held);
    }
    p.windows_done += 1;
    p.seconds = elapsed();
    if (progress) progress(p);
  }
  r.seconds = elapsed();
  return r;
}

}  // namespace kvtp
