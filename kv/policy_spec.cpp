// The --kv, --kv-quant and --kv-lowrank grammar (docs/KV.md): kv::PolicySpec from its strings,
// and back (describe).
#include <algorithm>
#include <cmath>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>

#include "kv/policy.h"

namespace kvtp::kv {
namespace {

std::map<std::string, std::string> parseArgs(const std::string& spec, std::string* name) {
  std::map<std::string, std::string> args;
  const auto colon = spec.find(':');
  *name = spec.substr(0, colon);
  if (colon == std::string::npos) return args;
  std::stringstream ss(spec.substr(colon + 1));
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) throw std::invalid_argument("'" + item + "' in '" + spec + "' is not key=value");
    args[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return args;
}

double number(const std::map<std::string, std::string>& a, const std::string& key, double fallback,
              const std::string& spec) {
  auto it = a.find(key);
  if (it == a.end()) return fallback;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(it->second, &used);
  } catch (const std::exception&) {
  }
  if (used != it->second.size() || !std::isfinite(v))
    throw std::invalid_argument(key + "=" + it->second + " in '" + spec + "' is not a number");
  return v;
}

void rejectUnknown(const std::map<std::string, std::string>& a, const std::vector<std::string>& known,
                   const std::string& spec) {
  for (auto& [k, v] : a)
    if (std::find(known.begin(), known.end(), k) == known.end())
      throw std::invalid_argument("'" + k + "' is not an option of '" + spec + "'");
}

// The tiered ladder's rungs by name, in the order a ladder steps down.
const std::pair<const char*, Form> kRungs[] = {{"fp16", Form::Full}, {"int8", Form::Int8}, {"int4", Form::Token4},
                                               {"int2", Form::Token2}};

const char* rungName(Form f) {
  for (const auto& [name, form] : kRungs)
    if (form == f) return name;
  return "?";
}

const char* methodName(Method m) {
  switch (m) {
    case Method::Full: return "full";
    case Method::StreamingLLM: return "streamingllm";
    case Method::H2O: return "h2o";
    case Method::Scissorhands: return "scissorhands";
    case Method::SnapKV: return "snapkv";
    case Method::PyramidKV: return "pyramidkv";
    case Method::Random: return "random";
    case Method::TOVA: return "tova";
    case Method::KNorm: return "knorm";
    case Method::KeyDiff: return "keydiff";
    case Method::LagKV: return "lagkv";
    case Method::SimLayerKV: return "simlayerkv";
    case Method::Leverage: return "leverage";
    case Method::CUR: return "cur";
    case Method::Expected: return "expected";
    case Method::NonCausal: return "noncausal";
    case Method::Compactor: return "compactor";
    case Method::Finch: return "finch";
    case Method::QFilters: return "qfilters";
  }
  return "?";
}

}  // namespace

bool PolicySpec::needsAttention() const {
  return method == Method::H2O || method == Method::Scissorhands || method == Method::SnapKV ||
         method == Method::PyramidKV || method == Method::TOVA || method == Method::SimLayerKV || method == Method::Finch;
}

bool PolicySpec::scoresDecoding() const {
  return method == Method::H2O || method == Method::Scissorhands || method == Method::TOVA ||
         (needsAttention() && decode != Decode::None);
}

std::string PolicySpec::describe() const {
  std::ostringstream o;
  o << methodName(method);
  if (evicts()) {
    o << ":";
    if (method == Method::SimLayerKV) o << "sinks=" << sinks << ",recent=" << recent << ",threshold=" << threshold;
    else if (budget_bytes) o << "bytes=" << budget_bytes;
    else if (budget_tokens) o << "tokens=" << budget_tokens;
    else o << "budget=" << budget;
    if (method != Method::SimLayerKV)
      o << ",sinks=" << sinks << ",recent=" << recent << ",scope="
        << (scope == Scope::Global ? "global" : scope == Scope::Layer ? "layer" : "head");
    if (method == Method::Random) o << ",seed=" << seed;
    if (method == Method::LagKV) o << ",lag=" << lag;
    if (method == Method::CUR) o << ",local=" << local;
    if (method == Method::QFilters && !filters.empty()) o << ",filters=" << filters;
    if (method == Method::Expected) o << ",future=" << future;
    if (method == Method::NonCausal || method == Method::Compactor) o << ",span=" << span;
    if (method == Method::Compactor && blend >= 0) o << ",blend=" << blend;
    if (block > 0) o << ",block=" << block;
    if (chunk > 1) o << ",chunk=" << chunk;
    if (evict_below > -INFINITY) o << ",evict_below=" << evict_below;
    if (critical > 0) o << ",critical=" << critical;
    if (think > 0) o << ",think=" << think;
    for (size_t i = 0; i < ladder.size(); ++i)
      o << (i ? "/" : ",ladder=") << (ladder[i] == Form::Kivi ? "kivi" + std::to_string(bits) : rungName(ladder[i]));
    if (interval > 1) o << ",interval=" << interval;
    if (decode != Decode::None)
      o << ",decode=" << (decode == Decode::Slide ? "slide" : decode == Decode::Adaptive ? "adaptive" : "discontinuous")
        << ",decode_budget=" << decode_budget << ",decode_recent=" << decode_recent << ",delta=" << delta;
  }
  if (!evicts() && think > 0) o << ":think=" << think;
  if (quant == Quant::Int8) o << " + int8";
  if (quant == Quant::Kivi) o << " + kivi:bits=" << bits << ",group=" << group << ",residual=" << residual;
  if (rank) o << " + cskv:rank=" << rank << ",window=" << lowrank_window;
  return o.str();
}

PolicySpec parsePolicy(const std::string& kv, const std::string& kv_quant, const std::string& kv_lowrank) {
  PolicySpec s;
  if (!kv.empty()) {
    std::string name;
    const auto a = parseArgs(kv, &name);
    const std::map<std::string, Method> methods = {{"full", Method::Full},       {"streamingllm", Method::StreamingLLM},
                                                   {"h2o", Method::H2O},         {"scissorhands", Method::Scissorhands},
                                                   {"snapkv", Method::SnapKV},   {"pyramidkv", Method::PyramidKV},
                                                   {"random", Method::Random},   {"tova", Method::TOVA},
                                                   {"knorm", Method::KNorm},     {"keydiff", Method::KeyDiff},
                                                   {"lagkv", Method::LagKV},     {"simlayerkv", Method::SimLayerKV},
                                                   {"leverage", Method::Leverage}, {"cur", Method::CUR},
                                                   {"expected", Method::Expected}, {"noncausal", Method::NonCausal},
                                                   {"compactor", Method::Compactor}, {"finch", Method::Finch},
                                                   {"qfilters", Method::QFilters}};
    auto m = methods.find(name);
    if (m == methods.end())
      throw std::invalid_argument("KV method '" + name +
                                  "' is not one of: full, streamingllm, h2o, scissorhands, snapkv, pyramidkv, random, "
                                  "tova, knorm, keydiff, lagkv, leverage, cur, qfilters, expected, noncausal, "
                                  "compactor, finch, simlayerkv");
    s.method = m->second;
    rejectUnknown(a, {"budget", "tokens", "bytes", "sinks", "recent", "scope", "history", "window", "kernel", "ratio", "decode",
                      "decode_budget", "decode_recent", "delta", "seed", "lag", "interval", "chunk", "threshold",
                      "evict_below", "ladder", "local", "future", "critical", "block", "span", "blend", "think",
                      "filters"},
                  kv);
    s.lag = int(number(a, "lag", s.lag, kv));
    s.local = int(number(a, "local", s.local, kv));
    s.future = int(number(a, "future", s.future, kv));
    s.span = int(number(a, "span", s.span, kv));
    s.blend = number(a, "blend", s.blend, kv);
    if (auto f = a.find("filters"); f != a.end()) {
      if (s.method != Method::QFilters)
        throw std::invalid_argument("filters= is qfilters' file of filters (" + kv + ")");
      s.filters = f->second;
    }
    s.think = number(a, "think", s.think, kv);
    if (s.think < 0 || s.think >= 1) throw std::invalid_argument("think must be in [0, 1) (" + kv + ")");
    if (s.span < 1) throw std::invalid_argument("span must be at least 1 (" + kv + ")");
    if (a.count("blend") && (s.method != Method::Compactor || s.blend < 0))
      throw std::invalid_argument("blend= (>= 0) weighs compactor's leverage (" + kv + ")");
    s.interval = int(number(a, "interval", s.interval, kv));
    s.chunk = int(number(a, "chunk", s.chunk, kv));
    s.threshold = number(a, "threshold", s.threshold, kv);
    s.evict_below = number(a, "evict_below", s.evict_below, kv);
    s.critical = number(a, "critical", s.critical, kv);
    s.block = int(number(a, "block", s.block, kv));
    if (s.block < 0) throw std::invalid_argument("block must be 0 (off) or more (" + kv + ")");
    if (s.block > 0 && !s.readsRows())
      throw std::invalid_argument("block= compresses the prompt in blocks for the methods that score the cached keys and "
                                  "values (knorm, keydiff, lagkv, leverage, cur, qfilters) (" + kv + ")");
    if (s.block > 0 && (s.critical > 0 || s.chunk > 1 || s.evict_below > -INFINITY || a.count("ladder")))
      throw std::invalid_argument("block= takes the method's own decision: not with critical=, chunk=, evict_below= or "
                                  "ladder= (" + kv + ")");
    if (s.critical < 0 || s.critical > 1) throw std::invalid_argument("critical must be in [0, 1] (" + kv + ")");
    if (s.critical > 0 && (s.method == Method::KNorm || s.method == Method::KeyDiff || s.method == Method::Leverage ||
                           s.method == Method::QFilters ||
                           s.method == Method::NonCausal || s.method == Method::Compactor ||
                           s.method == Method::SimLayerKV || s.method == Method::Full))
      throw std::invalid_argument("critical= rescales a method's nonnegative scores by ||W_o v||: not " +
                                  std::string(methodName(s.method)) + "'s (" + kv + ")");
    if (auto l = a.find("ladder"); l != a.end()) {
      std::stringstream ss(l->second);
      size_t at = 0;  // the rungs named must be a subsequence of kRungs, then maybe KIVI's
      for (std::string item; std::getline(ss, item, '/');) {
        if (!s.ladder.empty() && s.ladder.back() == Form::Kivi)
          throw std::invalid_argument("a ladder's KIVI rung is its lowest (" + kv + ")");
        if (item == "kivi4" || item == "kivi2") {
          s.bits = item == "kivi4" ? 4 : 2;
          s.ladder.push_back(Form::Kivi);
          continue;
        }
        const auto named = [&](const auto& r) { return item == r.first; };
        if (std::none_of(std::begin(kRungs), std::end(kRungs), named))
          throw std::invalid_argument("ladder rung '" + item +
                                      "' is not one of fp16, int8, int4, int2, kivi4, kivi2 (" + kv + ")");
        while (at < std::size(kRungs) && !named(kRungs[at])) ++at;
        if (at == std::size(kRungs))
          throw std::invalid_argument("a ladder steps down: fp16, int8, int4, int2 in order (" + kv + ")");
        s.ladder.push_back(kRungs[at++].second);
      }
      if (s.ladder.size() < 2 || s.ladder.front() != Form::Full)
        throw std::invalid_argument("a ladder starts at fp16 and has a lower rung, e.g. fp16/int8/int4 (" + kv + ")");
      if (s.ladder.back() == Form::Kivi)  // int8 would share KIVI's store; the per-token rungs above it have more bits
        for (Form f : s.ladder)
          if (f == Form::Int8 || f == Form::Token2 || (f == Form::Token4 && s.bits == 4))
            throw std::invalid_argument("above a KIVI rung a ladder holds fp16 (and int4 above kivi2), not " +
                                        std::string(rungName(f)) + " (" + kv + ")");
      if (s.method == Method::SimLayerKV) throw std::invalid_argument("simlayerkv keeps whole layers: no ladder (" + kv + ")");
      if (a.count("critical")) throw std::invalid_argument("critical= chooses entries, ladder= their forms: not both (" + kv + ")");
    }
    if (s.lag < 1 || s.interval < 1 || s.chunk < 1 || s.future < 1)
      throw std::invalid_argument("lag, interval, chunk and future must be at least 1 (" + kv + ")");
    if (s.local < 0) throw std::invalid_argument("local must be 0 (the whole head) or more (" + kv + ")");
    if (s.threshold < 0 || s.threshold > 1) throw std::invalid_argument("threshold must be in [0, 1] (" + kv + ")");
    if (s.method == Method::SimLayerKV && (a.count("budget") || a.count("tokens") || a.count("bytes") || a.count("scope")))
      throw std::invalid_argument("simlayerkv keeps whole layers or their sinks and recent window: it takes no budget or "
                                  "scope (" + kv + ")");
    s.budget = number(a, "budget", 1.0, kv);
    s.budget_tokens = int(number(a, "tokens", 0, kv));
    s.budget_bytes = int64_t(number(a, "bytes", 0, kv));
    s.sinks = int(number(a, "sinks", s.sinks, kv));
    s.recent = int(number(a, "recent", s.recent, kv));
    s.history = int(number(a, "history", s.history, kv));
    s.window = int(number(a, "window", s.window, kv));
    s.kernel = int(number(a, "kernel", s.kernel, kv));
    s.pyramid_ratio = number(a, "ratio", s.pyramid_ratio, kv);
    if (auto sc = a.find("scope"); sc != a.end()) {
      if (sc->second == "global") s.scope = Scope::Global;
      else if (sc->second == "layer") s.scope = Scope::Layer;
      else if (sc->second == "head") s.scope = Scope::Head;
      else throw std::invalid_argument("scope must be global, layer or head (" + kv + ")");
    }
    if (auto d = a.find("decode"); d != a.end()) {
      if (s.method != Method::SnapKV && s.method != Method::PyramidKV)
        throw std::invalid_argument("decode= (SCOPE) applies to snapkv and pyramidkv, which compress the prompt (" + kv + ")");
      if (d->second == "none") s.decode = Decode::None;
      else if (d->second == "slide") s.decode = Decode::Slide;
      else if (d->second == "adaptive") s.decode = Decode::Adaptive;
      else if (d->second == "discontinuous") s.decode = Decode::Discontinuous;
      else throw std::invalid_argument("decode must be none, slide, adaptive or discontinuous (" + kv + ")");
    }
    s.decode_budget = int(number(a, "decode_budget", s.decode_budget, kv));
    s.decode_recent = int(number(a, "decode_recent", s.decode_recent, kv));
    s.delta = int(number(a, "delta", s.delta, kv));
    const double seed = number(a, "seed", 0, kv);
    if (seed < 0 || seed != std::floor(seed) || seed > 9007199254740992.0)
      throw std::invalid_argument("seed must be a whole number >= 0 (" + kv + ")");
    s.seed = uint64_t(seed);
    if (s.decode_recent < 0 || s.delta < 1 || s.decode_budget < s.decode_recent)
      throw std::invalid_argument("SCOPE needs decode_budget >= decode_recent >= 0 and delta >= 1 (" + kv + ")");
    if (s.method == Method::PyramidKV) s.scope = Scope::Layer;  // its budgets are per layer by definition
    if (s.budget <= 0 || s.budget > 1) throw std::invalid_argument("budget must be in (0, 1] (" + kv + ")");
    if (s.budget_tokens < 0 || s.budget_bytes < 0 || s.sinks < 0 || s.recent < 0 || s.window < 1 || s.kernel < 1 || s.kernel % 2 == 0 ||
        s.history < 1 || s.history > 64 || s.pyramid_ratio < 1)
      throw std::invalid_argument("bad option value in '" + kv + "' (see docs/KV.md)");
  }
  if (!kv_quant.empty()) {
    std::string name;
    const auto a = parseArgs(kv_quant, &name);
    if (name == "int8") {
      rejectUnknown(a, {}, kv_quant);
      s.quant = Quant::Int8;
      s.bits = 8;
    } else if (name == "kivi") {
      rejectUnknown(a, {"bits", "group", "residual"}, kv_quant);
      s.quant = Quant::Kivi;
      s.bits = int(number(a, "bits", 2, kv_quant));
      s.group = int(number(a, "group", 32, kv_quant));
      s.residual = int(number(a, "residual", 128, kv_quant));
      if ((s.bits != 2 && s.bits != 4) || s.group < 1 || s.residual < 0)
        throw std::invalid_argument("kivi needs bits=2|4, group>=1, residual>=0 (" + kv_quant + ")");
    } else {
      throw std::invalid_argument("KV quantization '" + name + "' is not one of: int8, kivi");
    }
  }
  if (!kv_lowrank.empty()) {
    std::string name;
    const auto a = parseArgs(kv_lowrank, &name);
    if (name != "cskv") throw std::invalid_argument("KV low-rank method '" + name + "' is not cskv");
    rejectUnknown(a, {"rank", "window"}, kv_lowrank);
    s.rank = int(number(a, "rank", 0, kv_lowrank));
    s.lowrank_window = int(number(a, "window", s.lowrank_window, kv_lowrank));
    if (s.rank < 1 || s.lowrank_window < 0) throw std::invalid_argument("cskv needs rank>=1, window>=0 (" + kv_lowrank + ")");
  }
  if (!s.ladder.empty() && (s.quant != Quant::None || s.rank))
    throw std::invalid_argument("a ladder sets each entry's form itself: no --kv-quant or --kv-lowrank with it");
  if (s.think > 0 && (s.quant != Quant::None || s.rank || !s.ladder.empty() || s.method == Method::SimLayerKV))
    throw std::invalid_argument("think= prunes full-precision keys: not with --kv-quant, --kv-lowrank, ladder= or "
                                "simlayerkv");
  return s;
}

}  // namespace kvtp::kv
