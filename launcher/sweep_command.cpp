// kvtp sweep: perplexity against KV memory for a grid of compression specs on one model and
// data set, run here (every rank of the launch) or, with --array, the files of a job array a
// coordinator ran (kvtp submit sweep); either way a CSV and, with gnuplot, a PNG (launcher/sweep.h).
#include <cstdio>

#include "launcher/client.h"
#include "launcher/commands.h"
#include "launcher/ppl_options.h"
#include "launcher/sweep.h"
#include "runtime/error.h"

namespace kvtp::launcher {

void addSweepCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "Perplexity vs KV memory over a grid of compression specs (CSV + PNG)");
  struct Args {
    PplOptions ppl;
    SweepGrid grid;
    std::string out = "kv-sweep", array;
    ClientOptions client;
  };
  auto a = std::make_shared<Args>();
  addPplOptions(cmd, a->ppl);
  addSweepGridOptions(cmd, a->grid);
  cmd->add_option("--out", a->out, "output prefix: PREFIX.csv and PREFIX.png");
  cmd->add_option("--array", a->array, "write the files of this job array (kvtp submit sweep) from --coordinator");
  addClientOptions(cmd, a->client, false);
  cmd->callback([a] {
    if (!a->array.empty()) {
      if (a->client.token_file.empty()) throw Error("--array reads from a coordinator: give --token-file");
      Client c(a->client);
      if (const int rc = writeArray(c, a->array, a->out, false)) std::exit(rc);
      return;
    }
    PplJob base = a->ppl.resolve();
    base.mode = Mode::Decode;
    const comm::Topology topo = comm::makeTopology(a->ppl.tp);
    const bool lead = topo.world_rank == 0;
    std::unique_ptr<SweepFiles> files;
    if (lead) files = std::make_unique<SweepFiles>(a->out);
    for (const SweepRun& r : sweepRuns(a->grid, sweepContext(base, a->grid.caps))) {
      PplJob j = base;
      j.kv = r.kv;
      j.kv_quant = r.quant;
      const auto res = runPplJob(j, &topo);
      if (!lead) continue;
      const auto js = toJson(j, res);
      files->add(r, js);
      std::printf("%-40s ppl %9.4f  KV held %5.1f%%, peak %5.1f%% of full  (%.1f s)\n",
                  (r.kv + (r.quant.empty() ? "" : " " + r.quant)).c_str(), js["ppl"].get<double>(),
                  100 * js["kv_steady_ratio"].get<double>(), 100 * js["kv_ratio"].get<double>(), js["seconds"].get<double>());
      std::fflush(stdout);
    }
    if (lead) files->finish();
  });
}

}  // namespace kvtp::launcher
