#include "runtime/generate_job.h"

#include <algorithm>

#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/job_model.h"

namespace kvtp {
namespace {

void checkJob(const GenerateJob& job) {
  if (job.model_dir.empty() == job.synthetic.empty()) throw Error("give exactly one of --model and --synthetic");
  const bool texts = !job.prompts.empty() || !job.prompts_file.empty();
  if (texts == !job.input_ids.empty()) throw Error("give the prompts as text (--prompt, --prompts) or as --input-ids");
  if (!job.synthetic.empty() && texts) throw Error("--synthetic has no tokenizer: give its prompts as --input-ids");
  if (job.device != "cpu" && job.device != "cuda") throw Error("device '" + job.device + "' is not one of: cpu, cuda");
  if (job.batch > 1 && job.device != "cuda") throw Error("--batch generates several prompts together: it needs --device cuda");
  if (job.max_new_tokens < 1) throw Error("--max-new-tokens must be at least 1");
  job.sampling.validate();
}

}  // namespace

GenerateJobResult runGenerateJob(const GenerateJob& job, const comm::Topology* topo, const TokenFn& on_token,
                                 JobModel* model) {
  checkJob(job);
  kv::PolicySpec spec;
  try {
    spec = kv::parsePolicy(job.kv, job.kv_quant, job.kv_lowrank);
  } catch (const std::invalid_argument& e) {
    throw Error(e.what());
  }
  const Precision dtype = parsePrecision(job.resolvedDtype());
  const bool gpu = job.device == "cuda";
  if (!gpu && dtype != Precision::F32) throw Error("the CPU backend computes in fp32: --dtype fp16/bf16 need --device cuda");
  if (topo && topo->dp > 1)
    throw Error("generation runs on one tensor-parallel group: --tp must be the number of ranks (" +
                std::to_string(topo->tp * topo->dp) + ")");
  comm::Communicator* group = topo ? topo->group.get() : nullptr;

  // Everything that can fail on one rank alone (a file missing on one node), agreed on before the
  // first collective.
  JobModel own;
  JobModel& m = model ? *model : own;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<std::vector<int>> prompts;
  std::string local_error;
  try {
    if (!job.model_dir.empty()) tokenizer = loadTokenizer(job.model_dir);
    if (tokenizer) {
      std::vector<std::string> texts = job.prompts;
      if (!job.prompts_file.empty())
        for (auto& d : readDocuments(job.prompts_file)) texts.push_back(std::move(d));
      for (const auto& t : texts) prompts.push_back(tokenizer->encode(t));
    }
    if (!job.input_ids.empty()) prompts = readIdLines(job.input_ids);
    if (prompts.empty()) throw Error("no prompt to generate from");
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    if (m.name.empty())
      m = openJobModel({job.model_dir, job.synthetic, job.seed, job.layers}, gpu, int(longest) + job.max_new_tokens,
                       group);
  } catch (const std::exception& e) {
    local_error = e.what();
  }
  if (topo) comm::agreeOrThrow(*topo->world, local_error);
  else if (!local_error.empty()) throw Error(local_error);

  GenerateJobResult out;
  out.model = m.name;
  out.tp = m.part.tp;
  out.kv = spec.describe();
  if (topo) {  // every rank must run the same job on the same model
    const ModelConfig& c = m.config;
    nlohmann::json digest = {{"job", toJson(job, out)}, {"prompts", prompts}, {"vocab", c.vocab_size},
                             {"layers", c.layers}, {"hidden", c.hidden}, {"heads", c.heads}};
    comm::checkSameOnAllRanks(*topo->world, "the model config or job", digest.dump());
  }
  const JobEngine engine = startJobEngine(m, spec, gpu, dtype, false, topo);
  StopRule stop{job.max_new_tokens, job.ignore_eos ? std::vector<int>{} : m.config.eos_token_ids, job.stop};
  GenerateStats stats;
  out.sequences = generate(*engine.engine, m.config.max_positions, tokenizer.get(), prompts, job.sampling, stop,
                           job.batch, on_token, &stats);
  double totals[3] = {double(stats.kv_bytes_peak), double(stats.kv_bytes_full), double(stats.kv_bytes_steady)};
  out.seconds = stats.seconds;
  if (topo) {
    topo->world->allReduceSum(totals, 3);
    topo->world->allReduceMax(&out.seconds, 1);
  }
  out.kv_bytes_peak = int64_t(totals[0]), out.kv_bytes_full = int64_t(totals[1]), out.kv_bytes_steady = int64_t(totals[2]);
  out.new_tokens = stats.new_tokens;
  return out;
}

nlohmann::json toJson(const GenerateJob& job, const GenerateJobResult& r) {
  nlohmann::json seqs = nlohmann::json::array();
  for (const auto& g : r.sequences)
    seqs.push_back({{"prompt_tokens", g.prompt.size()}, {"ids", g.ids}, {"text", g.text}, {"finish", g.finish}});
  return {{"sequences", seqs},
          {"new_tokens", r.new_tokens},
          {"seconds", r.seconds},
          {"tokens_per_second", r.seconds > 0 ? double(r.new_tokens) / r.seconds : 0.0},
          {"model", r.model},
          {"kv", r.kv},
          {"tp", r.tp},
          {"device", job.device},
          {"dtype", job.resolvedDtype()},
          {"batch", job.batch},
          {"temperature", job.sampling.temperature},
          {"top_k", job.sampling.top_k},
          {"top_p", job.sampling.top_p},
          {"seed", job.sampling.seed},
          {"max_new_tokens", job.max_new_tokens},
          {"kv_bytes_peak", r.kv_bytes_peak},
          {"kv_bytes_full", r.kv_bytes_full},
          {"kv_ratio", r.kv_bytes_full ? double(r.kv_bytes_peak) / double(r.kv_bytes_full) : 0.0},
          {"kv_bytes_steady", r.kv_bytes_steady},
          {"kv_steady_ratio", r.kv_bytes_full ? double(r.kv_bytes_steady) / double(r.kv_bytes_full) : 0.0}};
}

}  // namespace kvtp
