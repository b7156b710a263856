// kvtp ppl: perplexity of a model on C4 documents or on given token ids, here (or under mpirun).
#include <cstdio>
#include <fstream>
#include <iostream>

#include "launcher/commands.h"
#include "launcher/ppl_options.h"
#include "launcher/progress.h"
#include "runtime/error.h"

namespace kvtp::launcher {

void writeLogprobs(const std::string& path, const PplResult& r) {
  std::ofstream out(path);
  if (!out) throw Error("cannot write '" + path + "'");
  for (size_t i = 0; i < r.sequences.size(); ++i)
    out << nlohmann::json{{"sequence", i}, {"logprobs", r.sequences[i].logprobs}}.dump() << "\n";
}

void addPplCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("ppl", "Perplexity of a model on C4 documents or token-id lines");
  struct Args {
    PplOptions ppl;
    bool json = false, quiet = false, verbose = false;
    std::string logprobs;
  };
  auto a = std::make_shared<Args>();
  addPplOptions(cmd, a->ppl);
  cmd->add_flag("--json", a->json, "print exactly one JSON object on stdout");
  cmd->add_option("--logprobs", a->logprobs, "write one JSON line per sequence with each token's log-prob");
  cmd->add_flag("--quiet", a->quiet, "no progress bar, no memory plan");
  cmd->add_flag("--verbose", a->verbose, "every rank logs, not only rank 0");

  cmd->callback([a] {
    const PplJob j = a->ppl.resolve();
    const comm::Topology topo = comm::makeTopology(a->ppl.tp);
    const bool lead = topo.world_rank == 0;  // prints results; other ranks stay quiet
    const std::string who = topo.mpi ? topo.prefix() + " " : "";
    ProgressBar bar(lead && !a->quiet);
    const PplJobResult r = runPplJob(
        j, &topo, [&](const Progress& p) { bar.update(p); },
        [&](const std::string& line) {
          if ((lead && !a->quiet) || a->verbose) std::fprintf(stderr, "%s%s\n", who.c_str(), line.c_str());
        });
    bar.finish();
    if (!lead) return;
    if (!a->logprobs.empty()) writeLogprobs(a->logprobs, r.result);
    if (a->json) {
      std::cout << toJson(j, r).dump() << std::endl;
    } else {
      std::printf("model %s  mode %s  seq_len %d  windows %d  tp %d  dp %d  %s %s\n", r.model.c_str(),
                  modeName(j.mode), r.seq_len, r.windows, r.tp, r.dp, j.device.c_str(), j.resolvedDtype().c_str());
      std::printf("ppl %.4f  over %lld tokens  (%.1f s, %.0f tok/s)\n", r.result.ppl(), (long long)r.result.tokens,
                  r.result.seconds, r.result.tokensPerSecond());
      if (j.mode == Mode::Decode) {
        const auto js = toJson(j, r);
        std::printf("KV cache %s: held %.1f%%, peak %.1f%% of the full fp16 cache (%lld of %lld bytes at peak)\n",
                    r.kv.c_str(), 100 * js["kv_steady_ratio"].get<double>(), 100 * js["kv_ratio"].get<double>(),
                    (long long)js["kv_bytes_peak"].get<int64_t>(), (long long)js["kv_bytes_full"].get<int64_t>());
      }
    }
  });
}

}  // namespace kvtp::launcher
