#include "runtime/ppl_job.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/job_model.h"
#include "runtime/tokenizer.h"

namespace kvtp {

void applyPreset(PplJob& job, const std::string& preset) {
  if (preset == "default") return;
  if (preset == "gptq") {  // GPTQ / SparseGPT C4: first 1100 docs joined by ' ', 256 x 2048
    job.join = " ";
    job.max_docs = 1100;
    job.seq_len = 2048;
    job.max_windows = 256;
    job.drop_partial = true;
    return;
  }
  throw Error("preset '" + preset + "' is not one of: default, gptq");
}

namespace {

std::string mib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", double(bytes) / (1 << 20));
  return b;
}

// Rebuilds per-sequence results from every window's log-probs laid end to end.
PplResult assemble(const std::vector<Window>& windows, const std::vector<double>& flat, int sequences) {
  PplResult r;
  r.sequences.resize(sequences);
  size_t at = 0;
  for (const auto& w : windows) {
    auto& s = r.sequences[w.sequence];
    for (int64_t i = 0; i < w.scored(); ++i, ++at) {
      s.logprobs.push_back(flat[at]);
      s.nll -= flat[at];
      s.tokens += 1;
      r.nll -= flat[at];
      r.tokens += 1;
    }
  }
  return r;
}

// Loads the model (or opens its checkpoint) and cuts the input into windows: everything that
// can fail on one rank alone.
void prepare(const PplJob& job, comm::Communicator* group, JobModel& m, PplJobResult& out,
             std::vector<Window>& windows, int& sequences) {
  m = openJobModel({job.model_dir, job.synthetic, job.seed, job.layers}, job.device == "cuda", job.seq_len, group);
  out.model = m.name;
  const ModelConfig& c = m.config;
  out.seq_len = std::min(job.seq_len, c.max_positions);

  if (!job.data.empty()) {
    const auto tokenizer = loadTokenizer(job.model_dir);
    if (tokenizer->vocabSize() > c.vocab_size)
      throw Error("tokenizer has " + std::to_string(tokenizer->vocabSize()) + " ids but the model's vocab_size is " +
                  std::to_string(c.vocab_size));
    const auto docs = readDocuments(job.data, job.max_docs);
    std::string text;
    for (size_t i = 0; i < docs.size(); ++i) text += (i ? job.join : "") + docs[i];
    windows = planWindows(tokenizer->encode(text), out.seq_len, job.stride, job.drop_partial);
    if (job.max_windows > 0 && int(windows.size()) > job.max_windows) windows.resize(job.max_windows);
    for (auto& w : windows) w.sequence = sequences++;
  } else {
    const auto lines = readIdLines(job.input_ids);
    for (const auto& ids : lines) {
      if (ids.size() < 2) throw Error("'" + job.input_ids + "' line " + std::to_string(sequences + 1) +
                                      " has fewer than 2 tokens: nothing to predict");
      for (auto& w : planWindows(ids, out.seq_len, job.stride, false, sequences)) windows.push_back(std::move(w));
      ++sequences;
    }
    if (job.max_windows > 0 && int(windows.size()) > job.max_windows) windows.resize(job.max_windows);
    sequences = windows.empty() ? 0 : windows.back().sequence + 1;
  }
}

}  // namespace

PplJobResult runPplJob(const PplJob& job, const comm::Topology* topo, const ProgressFn& progress, const PlanFn& plan) {
  if (job.model_dir.empty() == job.synthetic.empty()) throw Error("give exactly one of --model and --synthetic");
  if (job.data.empty() == job.input_ids.empty()) throw Error("give exactly one of --data and --input-ids");
  if (!job.synthetic.empty() && !job.data.empty())
    throw Error("--synthetic has no tokenizer: score --input-ids with it, not --data");
  kv::PolicySpec spec;
  try {
    spec = kv::parsePolicy(job.kv, job.kv_quant, job.kv_lowrank);
  } catch (const std::invalid_argument& e) {
    throw Error(e.what());
  }
  if ((spec.compresses() || job.prefill > 0) && job.mode != Mode::Decode)
    throw Error("--kv, --kv-quant, --kv-lowrank and --prefill evaluate token by token: use --mode decode");
  if (job.prefill < 0) throw Error("--prefill must not be negative");
  if (job.batch < 1 || job.batch > 256) throw Error("--batch must be in 1..256");
  if (job.batch > 1 && (job.mode != Mode::Decode || job.device != "cuda"))
    throw Error("--batch decodes several windows together: it needs --mode decode and --device cuda");
  if (job.device != "cpu" && job.device != "cuda") throw Error("device '" + job.device + "' is not one of: cpu, cuda");
  const Precision dtype = parsePrecision(job.resolvedDtype());
  const bool gpu = job.device == "cuda";
  if (!gpu && dtype != Precision::F32) throw Error("the CPU backend computes in fp32: --dtype fp16/bf16 need --device cuda");

  comm::Communicator* group = topo ? topo->group.get() : nullptr;
  JobModel m;
  PplJobResult out;
  std::vector<Window> windows;
  int sequences = 0;
  // Loading and tokenizing fail per rank (a file missing on one node): all ranks agree on the
  // outcome before the first collective of the forward pass, so none waits for a dead one.
  std::string local_error;
  try {
    prepare(job, group, m, out, windows, sequences);
  } catch (const std::exception& e) {
    local_error = e.what();
  }
  if (topo) comm::agreeOrThrow(*topo->world, local_error);
  else if (!local_error.empty()) throw Error(local_error);
  const ModelConfig& c = m.config;
  if (windows.empty()) throw Error("no window of at least 2 tokens to score");
  out.windows = int(windows.size());
  out.tp = m.part.tp;
  out.dp = topo ? topo->dp : 1;
  const int group_index = topo ? topo->group_index : 0;
  out.kv = spec.describe();  // part of the job every rank must agree on
  if (topo) {  // every rank must run the same job on the same model
    nlohmann::json digest = {{"job", toJson(job, out)}, {"vocab", c.vocab_size}, {"layers", c.layers},
                             {"hidden", c.hidden}, {"heads", c.heads}, {"kv_heads", c.kv_heads}, {"ffn", c.ffn}};
    digest["job"].erase("seconds");
    digest["job"].erase("tokens_per_second");
    comm::checkSameOnAllRanks(*topo->world, "the model config or job", digest.dump());
  }

  // Data parallel: group g scores windows g, g + dp, g + 2 dp, ...
  std::vector<Window> mine;
  for (size_t i = 0; i < windows.size(); ++i)
    if (int(i % out.dp) == group_index) mine.push_back(windows[i]);
  // Weights and a full cache are stored in the dtype (norms and biases stay float32: negligible).
  const int elem = dtype == Precision::F32 ? 4 : 2;
  out.weight_bytes = weightElements(c, m.part) * elem;
  int longest = 0;
  for (auto& w : mine) longest = std::max(longest, int(w.ids.size()));
  out.kv_plan_bytes = int64_t(longest) * c.layers * m.part.kv_heads *
                      (2 * c.head_dim * int64_t(elem) + int64_t(sizeof(int32_t)));
  if (plan)
    plan("memory plan per rank (tp " + std::to_string(out.tp) + ", dp " + std::to_string(out.dp) + ", " + job.device +
         " " + precisionName(dtype) + "): weights " + mib(out.weight_bytes) + ", KV cache " + mib(out.kv_plan_bytes) +
         " at " + std::to_string(longest) + " tokens (uncompressed)");
  const JobEngine engine = startJobEngine(m, spec, gpu, dtype, job.time_collectives, topo);
  PplResult local = scoreWindows(*engine.engine, mine, sequences, job.mode, progress, job.prefill, job.batch);
  // KV bytes and collective seconds per rank of the group (largest over the data-parallel groups).
  const int tp = out.tp, grank = group ? group->rank() : 0;
  auto perRank = [&](auto value) {  // every rank's value, in group rank order
    std::vector<double> v(size_t(tp), 0.0);
    v[size_t(grank)] = double(value);
    if (topo) topo->world->allReduceMax(v.data(), v.size());
    return std::vector<decltype(value)>(v.begin(), v.end());
  };
  out.kv_bytes_peak = perRank(local.kv_bytes_peak);
  out.kv_bytes_full = perRank(local.kv_bytes_full);
  out.kv_bytes_steady = perRank(local.kv_bytes_steady);
  out.device_bytes_peak = perRank(gpu ? deviceBytesPeak() : 0);
  out.collective_seconds = perRank(engine.engine->collectiveSeconds());
  if (out.dp == 1) {
    out.result = std::move(local);
    return out;
  }
  // Lay every window's log-probs end to end; each group's first rank fills its windows, and a
  // world all-reduce (the others add zeros) gives every rank all of them.
  std::vector<int64_t> offset(windows.size() + 1, 0);
  for (size_t i = 0; i < windows.size(); ++i) offset[i + 1] = offset[i] + windows[i].scored();
  std::vector<double> flat(size_t(offset.back()), 0.0);
  if (topo->group->rank() == 0) {
    std::vector<size_t> next(size_t(sequences), 0);  // read position in each local sequence
    for (size_t i = 0; i < windows.size(); ++i) {
      if (int(i % out.dp) != group_index) continue;
      const auto& lp = local.sequences[windows[i].sequence].logprobs;
      auto& at = next[windows[i].sequence];
      std::copy_n(lp.begin() + int64_t(at), windows[i].scored(), flat.begin() + offset[i]);
      at += size_t(windows[i].scored());
    }
  }
  topo->world->allReduceSum(flat.data(), flat.size());
  double seconds = local.seconds;
  topo->world->allReduceMax(&seconds, 1);
  out.result = assemble(windows, flat, sequences);
  out.result.seconds = seconds;
  return out;
}

nlohmann::json toJson(const PplJob& job, const PplJobResult& r) {
  int64_t peak = 0, full = 0, steady = 0;
  for (auto b : r.kv_bytes_peak) peak += b;
  for (auto b : r.kv_bytes_full) full += b;
  for (auto b : r.kv_bytes_steady) steady += b;
  // The largest rank's share of the job's time spent in collectives (0 where not measured).
  double collective_share = 0;
  for (double s : r.collective_seconds)
    if (r.result.seconds > 0) collective_share = std::max(collective_share, s / r.result.seconds);
  nlohmann::json seqs = nlohmann::json::array();
  for (auto& s : r.result.sequences) seqs.push_back({{"ppl", s.ppl()}, {"tokens", s.tokens}});
  return {{"ppl", r.result.ppl()},
          {"nll", r.result.nll},
          {"tokens", r.result.tokens},
          {"sequences", seqs},
          {"seconds", r.result.seconds},
          {"tokens_per_second", r.result.tokensPerSecond()},
          {"model", r.model},
          {"data", job.data.empty() ? job.input_ids : job.data},
          {"mode", modeName(job.mode)},
          {"seq_len", r.seq_len},
          {"stride", job.stride},
          {"windows", r.windows},
          {"tp", r.tp},
          {"dp", r.dp},
          {"kv", r.kv},
          {"device", job.device},
          {"dtype", job.resolvedDtype()},
          {"prefill", job.prefill},
          {"batch", job.batch},
          {"kv_bytes_peak", peak},
          {"kv_bytes_full", full},
          {"kv_ratio", full ? double(peak) / double(full) : 0.0},
          {"kv_bytes_steady", steady},
          {"kv_steady_ratio", full ? double(steady) / double(full) : 0.0},
          {"kv_bytes_peak_per_rank", r.kv_bytes_peak},
          {"kv_bytes_full_per_rank", r.kv_bytes_full},
          {"device_bytes_peak_per_rank", r.device_bytes_peak},
          {"collective_seconds_per_rank", r.collective_seconds},
          {"collective_share", collective_share}};
}

}  // namespace kvtp
