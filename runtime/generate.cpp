#include "runtime/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "kernels/splitmix.h"
#include "runtime/error.h"

namespace kvtp {

void Sampling::validate() const {
  if (!(temperature >= 0) || !std::isfinite(temperature)) throw Error("--temperature must be 0 (greedy) or positive");
  if (top_k < 0) throw Error("--top-k must not be negative (0: every token)");
  if (!(top_p > 0 && top_p <= 1)) throw Error("--top-p must be in (0, 1]");
}

int chooseToken(const float* logits, int vocab, const Sampling& s, double draw) {
  if (s.temperature == 0) return int(std::max_element(logits, logits + vocab) - logits);
  // Candidates most likely first (the lower id first on a tie), cut to top-k.
  std::vector<int> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  auto likelier = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const int k = s.top_k > 0 ? std::min(s.top_k, vocab) : vocab;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), likelier);
  order.resize(size_t(k));
  std::vector<double> p(order.size());
  const double top = logits[order[0]] / s.temperature;
  double total = 0;
  for (size_t i = 0; i < order.size(); ++i) total += p[i] = std::exp(logits[order[i]] / s.temperature - top);
  // Top-p: the shortest prefix whose probability reaches p (at least one token).
  size_t kept = order.size();
  if (s.top_p < 1) {
    double sum = 0;
    for (kept = 0; kept < order.size();) {
      sum += p[kept++] / total;
      if (sum >= s.top_p) break;
    }
    total = std::accumulate(p.begin(), p.begin() + int64_t(kept), 0.0);
  }
  double cumulative = 0;
  for (size_t i = 0; i < kept; ++i) {
    cumulative += p[i];
    if (draw * total < cumulative) return order[i];
  }
  return order[kept - 1];  // draw * total rounded up to the total
}

double samplingDraw(uint64_t seed, int sequence, int step) {
  // splitmix64 over the three numbers in turn.
  using kernels::splitmix64;
  return kernels::unitInterval(
      splitmix64(splitmix64(splitmix64(seed) ^ uint64_t(uint32_t(sequence))) ^ uint64_t(uint32_t(step))));
}

namespace {

// One sequence being generated: its ids, its text and what of it was streamed.
struct Running {
  int index = 0;     // the prompt's index (its sampling stream)
  int limit = 0;     // new tokens it may take
  bool context_limited = false;
  Generated g;
  size_t streamed = 0;
  bool done = false;
};

// Adds `id` to `r`: decides whether the sequence ends and streams the text that became certain.
void accept(Running& r, int id, const Tokenizer* tokenizer, const StopRule& stop, const TokenFn& on_token) {
  r.g.ids.push_back(id);
  if (std::find(stop.eos.begin(), stop.eos.end(), id) != stop.eos.end()) r.g.finish = "eos";
  else if (int(r.g.ids.size()) >= r.limit) r.g.finish = r.context_limited ? "context" : "length";
  std::string delta;
  if (tokenizer) {
    std::string text = tokenizer->decode(r.g.ids);
    size_t first_stop = std::string::npos;
    for (const auto& s : stop.stop) first_stop = std::min(first_stop, text.find(s));
    size_t certain = tokenizer->decodeSettled(r.g.ids).size();  // what later tokens cannot change
    if (first_stop != std::string::npos) {
      text.resize(first_stop), certain = first_stop, r.g.finish = "stop";
    } else {
      for (const auto& s : stop.stop)  // hold back a tail that may be the start of a stop string
        for (size_t n = std::min(s.size() - 1, text.size()); n > 0; --n)
          if (text.compare(text.size() - n, n, s, 0, n) == 0) {
            certain = std::min(certain, text.size() - n);
            break;
          }
    }
    if (!r.g.finish.empty()) certain = text.size();  // the end: everything goes out
    if (certain > r.streamed) delta = text.substr(r.streamed, certain - r.streamed), r.streamed = certain;
    r.g.text = std::move(text);
  }
  r.done = !r.g.finish.empty();
  if (on_token) on_token(r.index, id, delta);
}

}  // namespace

std::vector<Generated> generate(Engine& engine, int max_positions, const Tokenizer* tokenizer,
                                const std::vector<std::vector<int>>& prompts, const Sampling& sampling,
                                const StopRule& stop, int batch, const TokenFn& on_token, GenerateStats* stats) {
  sampling.validate();
  if (stop.max_new_tokens < 1) throw Error("--max-new-tokens must be at least 1");
  if (batch < 1 || batch > 256) throw Error("--batch must be in 1..256");
  if (!stop.stop.empty() && !tokenizer) throw Error("stop strings need the model's tokenizer (not --synthetic)");
  for (const auto& s : stop.stop)
    if (s.empty()) throw Error("a stop string must not be empty");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw Error("prompt " + std::to_string(i + 1) + " has no tokens");
    if (int(prompts[i].size()) >= max_positions)
      throw Error("prompt " + std::to_string(i + 1) + " has " + std::to_string(prompts[i].size()) +
                  " tokens: it leaves no room in the model's " + std::to_string(max_positions) + " positions");
  }
  const auto t0 = std::chrono::steady_clock::now();
  GenerateStats local;
  const bool compresses = engine.compresses();
  auto account = [&](int tokens_seen) {
    const kv::KvBytes b = engine.kvBytes(tokens_seen);
    local.kv_bytes_peak = std::max(local.kv_bytes_peak, b.stored);
    local.kv_bytes_full = std::max(local.kv_bytes_full, b.full);
  };
  auto settled = [&](int tokens_seen) {
    local.kv_bytes_steady = std::max(local.kv_bytes_steady, engine.kvBytes(tokens_seen).stored);
  };
  auto compress = [&](int b, int last_pos, bool prefill) {
    engine.useSequence(b);
    if (compresses) account(last_pos + 1);
    engine.compress(last_pos, prefill);
    if (compresses) settled(last_pos + 1);
  };

  std::vector<Generated> out(prompts.size());
  for (size_t next = 0; next < prompts.size();) {
    // A batch: prompts in order while every one of them can be fed for as many steps as the
    // longest-running one may take (a sequence that ended is still fed until the batch ends).
    std::vector<Running> runs;
    int steps = 0, longest_prompt = 0;
    while (next < prompts.size() && int(runs.size()) < batch) {
      Running r;
      r.index = int(next);
      const int n = int(prompts[next].size());
      r.limit = std::min(stop.max_new_tokens, max_positions - n);
      r.context_limited = r.limit < stop.max_new_tokens;
      const int s = std::max(steps, r.limit), longest = std::max(longest_prompt, n);
      if (!runs.empty() && longest + s > max_positions + 1) break;
      steps = s, longest_prompt = longest;
      r.g.prompt = prompts[next++];
      runs.push_back(std::move(r));
    }
    const int B = int(runs.size());
    if (batch > 1) engine.reserve(B, longest_prompt + steps);
    for (int b = 0; b < B; ++b) {
      Running& r = runs[size_t(b)];
      const int n = int(r.g.prompt.size());
      std::vector<int> positions(static_cast<size_t>(n));
      std::iota(positions.begin(), positions.end(), 0);
      engine.useSequence(b);
      engine.startWindow();
      const auto logits = engine.stepLogits(r.g.prompt.data(), positions.data(), n);
      compress(b, n - 1, true);
      accept(r, chooseToken(logits.data(), int(logits.size()), sampling, samplingDraw(sampling.seed, r.index, 0)),
             tokenizer, stop, on_token);
    }
    std::vector<int> tokens(static_cast<size_t>(B)), positions(static_cast<size_t>(B));
    for (int t = 1; std::any_of(runs.begin(), runs.end(), [](const Running& r) { return !r.done; }); ++t) {
      for (int b = 0; b < B; ++b)
        tokens[b] = runs[b].g.ids.back(), positions[b] = int(runs[b].g.prompt.size()) + t - 1;
      std::vector<float> logits;
      if (B > 1) {
        logits = engine.decodeBatchLogits(tokens.data(), positions.data());
      } else {
        engine.useSequence(0);
        logits = engine.stepLogits(tokens.data(), positions.data(), 1);
      }
      const int vocab = int(logits.size()) / B;
      if (B > 1) {  // the batch's decisions at once (accounted as one at a time would be)
        for (int b = 0; b < B && compresses; ++b) engine.useSequence(b), account(positions[b] + 1);
        engine.compressBatch(positions);
        for (int b = 0; b < B && compresses; ++b) engine.useSequence(b), settled(positions[b] + 1);
      } else {
        compress(0, positions[0], false);
      }
      for (int b = 0; b < B; ++b) {
        Running& r = runs[size_t(b)];
        if (r.done) continue;
        const int id = chooseToken(logits.data() + size_t(b) * vocab, vocab, sampling,
                                   samplingDraw(sampling.seed, r.index, t));
        accept(r, id, tokenizer, stop, on_token);
      }
    }
    for (int b = 0; b < B; ++b) {
      Running& r = runs[size_t(b)];
      if (!compresses) {
        engine.useSequence(b);
        account(int(r.g.prompt.size() + r.g.ids.size()) - 1);  // every token fed to the model
        local.kv_bytes_steady = local.kv_bytes_peak;
      }
      local.new_tokens += int64_t(r.g.ids.size());
      out[size_t(r.index)] = std::move(r.g);
    }
  }
  local.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats) *stats = local;
  return out;
}

}  // namespace kvtp
