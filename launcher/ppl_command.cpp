// kvtp ppl: perplexity of a model on C4-style documents or on given token ids.
#include <cstdio>
#include <fstream>
#include <iostream>

#include "launcher/commands.h"
#include "launcher/progress.h"
#include "runtime/error.h"
#include "runtime/ppl_job.h"

namespace kvtp::launcher {

void addPplCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("ppl", "Perplexity of a model on C4 documents or token-id lines");
  auto job = std::make_shared<PplJob>();
  auto opts = std::make_shared<std::tuple<std::string, std::string, bool, std::string, bool, int, bool>>();
  auto& [mode, preset, json, logprobs_path, quiet, tp, verbose] = *opts;
  mode = "prefill";
  preset = "default";
  cmd->add_option("--model", job->model_dir, "Hugging Face model folder (config.json + safetensors + tokenizer)");
  cmd->add_option("--synthetic", job->synthetic, "random weights of a preset shape (e.g. opt-125m) or config.json");
  cmd->add_option("--seed", job->seed, "seed of --synthetic weights");
  cmd->add_option("--data", job->data, "C4-style documents: .json.gz / .jsonl / .json with a \"text\" field");
  cmd->add_option("--input-ids", job->input_ids, "file of token-id lines, each scored on its own");
  cmd->add_option("--preset", preset, "evaluation protocol: default, gptq (docs/PERPLEXITY.md)");
  auto* seq = cmd->add_option("--seq-len", job->seq_len, "window length (capped at the model's max positions)");
  auto* stride = cmd->add_option("--stride", job->stride, "slide windows by S, scoring only new tokens");
  auto* maxw = cmd->add_option("--max-windows", job->max_windows, "score at most K windows (0 = all)");
  auto* maxd = cmd->add_option("--max-docs", job->max_docs, "read at most D documents (0 = all)");
  auto* join = cmd->add_option("--join", job->join, "separator between documents (default two newlines)");
  auto* drop = cmd->add_flag("--drop-partial", job->drop_partial, "drop a last window shorter than --seq-len");
  cmd->add_option("--mode", mode, "prefill (a window at once) or decode (token by token through the KV cache)")
      ->check(CLI::IsMember({"prefill", "decode"}));
  cmd->add_flag("--json", json, "print exactly one JSON object on stdout");
  cmd->add_option("--logprobs", logprobs_path, "write one JSON line per sequence with each token's log-prob");
  cmd->add_flag("--quiet", quiet, "no progress bar, no memory plan");
  cmd->add_flag("--verbose", verbose, "every rank logs, not only rank 0");
  cmd->add_option("--tp", tp, "tensor-parallel degree under mpirun (default: the world size)");
  cmd->add_option("--layers", job->layers, "with --synthetic: use only the first K layers");

  cmd->callback([=] {
    auto& [mode, preset, json, logprobs_path, quiet, tp, verbose] = *opts;
    PplJob j = *job;
    // A preset sets the protocol; options given explicitly still win.
    PplJob p;
    applyPreset(p, preset);
    if (!seq->count()) j.seq_len = p.seq_len;
    if (!stride->count()) j.stride = p.stride;
    if (!maxw->count()) j.max_windows = p.max_windows;
    if (!maxd->count()) j.max_docs = p.max_docs;
    if (!join->count()) j.join = p.join;
    if (!drop->count()) j.drop_partial = p.drop_partial;
    j.mode = parseMode(mode);

    const comm::Topology topo = comm::makeTopology(tp);
    const bool lead = topo.world->rank() == 0;  // prints results; other ranks stay quiet
    const std::string who = topo.mpi ? topo.prefix() + " " : "";
    ProgressBar bar(lead && !quiet);
    const PplJobResult r = runPplJob(
        j, &topo, [&](const Progress& p) { bar.update(p); },
        [&](const std::string& line) {
          if ((lead && !quiet) || verbose) std::fprintf(stderr, "%s%s\n", who.c_str(), line.c_str());
        });
    bar.finish();
    if (!lead) return;

    if (!logprobs_path.empty()) {
      std::ofstream out(logprobs_path);
      if (!out) throw Error("cannot write '" + logprobs_path + "'");
      for (size_t i = 0; i < r.result.sequences.size(); ++i)
        out << nlohmann::json{{"sequence", i}, {"logprobs", r.result.sequences[i].logprobs}}.dump() << "\n";
    }
    if (json) {
      std::cout << toJson(j, r).dump() << std::endl;
    } else {
      std::printf("model %s  mode %s  seq_len %d  windows %d  tp %d  dp %d\n", r.model.c_str(), modeName(j.mode),
                  r.seq_len, r.windows, r.tp, r.dp);
      std::printf("ppl %.4f  over %lld tokens  (%.1f s, %.0f tok/s)\n", r.result.ppl(),
                  (long long)r.result.tokens, r.result.seconds, r.result.tokensPerSecond());
    }
  });
}

}  // namespace kvtp::launcher
