// kvtp passkey: the passkey retrieval test (runtime/passkey.h) through the compressed KV cache —
// a table and a heat map (prompt length x key depth) of what the model still retrieves.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "launcher/commands.h"
#include "launcher/gnuplot.h"
#include "launcher/progress.h"
#include "launcher/sweep.h"
#include "runtime/config.h"
#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/generate_job.h"
#include "runtime/job_model.h"
#include "runtime/passkey.h"

namespace kvtp::launcher {
namespace {

std::vector<int> parseLengths(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) {
      try {
        out.push_back(std::stoi(item));
      } catch (const std::exception&) {
        throw Error("--lengths: '" + item + "' is not a number of tokens");
      }
    }
  return out;
}

struct Cell {
  double exact = 0, partial = 0;
  int n = 0;
};

// PREFIX.png: exact and partial match side by side, prompt length (rows) by key depth (columns).
// Says which files it wrote on `report` (stderr under --json, so stdout stays one object).
void plot(const std::string& prefix, const std::vector<int>& lengths, int depths, const std::map<std::pair<int, int>, Cell>& cells,
          const std::string& title, FILE* report) {
  std::ofstream gp(prefix + ".gp");
  gp << "set terminal pngcairo size 1200,520\nset output " << gnuplotString(prefix + ".png") << "\n"
     << "set multiplot layout 1,2 title " << gnuplotString(title) << "\n"
     << "set xlabel 'key depth (% of the background)'\nset ylabel 'prompt length (tokens)'\n"
     << "set cbrange [0:100]\nset palette defined (0 '#b2182b', 50 '#fddbc7', 100 '#2166ac')\n"
     << "set xrange [-0.5:" << depths - 0.5 << "]\nset yrange [-0.5:" << lengths.size() - 0.5 << "]\n";
  gp << "set xtics (";
  for (int d = 0; d < depths; ++d) gp << (d ? ", " : "") << "'" << (depths == 1 ? 0 : 100 * d / (depths - 1)) << "' " << d;
  gp << ")\nset ytics (";
  for (size_t l = 0; l < lengths.size(); ++l) gp << (l ? ", " : "") << "'" << lengths[l] << "' " << l;
  gp << ")\n";
  for (const char* which : {"exact", "partial"}) {
    gp << "$" << which << " << EOD\n";
    for (size_t l = 0; l < lengths.size(); ++l)
      for (int d = 0; d < depths; ++d) {
        const Cell& c = cells.at({int(l), d});
        gp << d << " " << l << " " << 100 * (std::string(which) == "exact" ? c.exact : c.partial) / c.n << "\n";
      }
    gp << "EOD\n";
  }
  gp << "set title 'exact match (%)'\nplot $exact using 1:2:3 with image notitle, "
        "$exact using 1:2:(sprintf('%.0f', $3)) with labels notitle\n"
     << "set title 'partial match (%)'\nplot $partial using 1:2:3 with image notitle, "
        "$partial using 1:2:(sprintf('%.0f', $3)) with labels notitle\nunset multiplot\n";
  gp.close();
  if (runGnuplot(prefix + ".gp"))
    std::fprintf(report, "wrote %s.csv, %s.json and %s.png\n", prefix.c_str(), prefix.c_str(), prefix.c_str());
  else
    std::fprintf(report, "wrote %s.csv and %s.json (no PNG: gnuplot failed or is missing)\n", prefix.c_str(), prefix.c_str());
}

}  // namespace

void addPasskeyCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("passkey", "Passkey retrieval through the KV cache: a table and heat map (length x depth)");
  struct Args {
    GenerateJob job;
    PasskeyGrid grid;
    std::string data = "data/c4/c4-heldout-200.json.gz", lengths, out = "passkey", specs;
    int tp = 0;
    bool json = false, quiet = false;
  };
  auto a = std::make_shared<Args>();
  a->job.max_new_tokens = 12;
  cmd->add_option("--model", a->job.model_dir, "Hugging Face model folder")->required();
  cmd->add_option("--data", a->data, "background text: C4-style documents, in order");
  cmd->add_option("--lengths", a->lengths, "prompt lengths in tokens, comma-separated (default: 4 up to the context)");
  cmd->add_option("--depths", a->grid.depths, "key depths from 0 % to 100 % of the background (default 5)");
  cmd->add_option("--trials", a->grid.trials, "keys per (length, depth) (default 2)");
  cmd->add_option("--digits", a->grid.digits, "digits of a key (default 7)");
  cmd->add_option("--seed", a->grid.seed, "draws the keys");
  cmd->add_option("--max-new-tokens", a->job.max_new_tokens, "tokens of each answer (greedy; default 12)");
  cmd->add_option("--kv", a->job.kv, "KV eviction, e.g. h2o:budget=0.2 (docs/KV.md)");
  cmd->add_option("--kv-quant", a->job.kv_quant, "KV quantization: int8 | kivi:bits=2,group=32,residual=128");
  cmd->add_option("--kv-lowrank", a->job.kv_lowrank, "low-rank KV channels: cskv:rank=R,window=W");
  cmd->add_option("--batch", a->job.batch, "cuda: prompts generated together");
  cmd->add_option("--device", a->job.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", a->job.dtype, "fp32, fp16, bf16")->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  cmd->add_option("--tp", a->tp, "tensor-parallel degree (default: the world size under mpirun)");
  cmd->add_option("--specs", a->specs,
                  "several compressions, semicolon-separated, each 'KV' or 'KV|QUANT' ('full': none): PREFIX-N.* for "
                  "the N-th and PREFIX-summary.csv, one row each (instead of --kv, --kv-quant)");
  cmd->add_option("--out", a->out, "writes PREFIX.csv (every case), PREFIX.json (the summary) and PREFIX.png");
  cmd->add_flag("--json", a->json, "print the summary as one JSON object");
  cmd->add_flag("--quiet", a->quiet, "no progress bar");

  cmd->callback([a] {
    const comm::Topology topo = comm::makeTopology(a->tp);
    const bool lead = topo.world_rank == 0;
    PasskeyGrid grid = a->grid;
    grid.lengths = parseLengths(a->lengths);
    if (grid.lengths.empty()) {  // a quarter, a half, three quarters and all of the context
      const int room = loadConfig(a->job.model_dir).max_positions - a->job.max_new_tokens;
      for (int q = 1; q <= 4; ++q) grid.lengths.push_back(room * q / 4);
    }
    // Every rank builds the same prompts (the job checks that they agree).
    const auto cases = passkeyCases(*loadTokenizer(a->job.model_dir), readDocuments(a->data), grid);
    // One compression's run: its files under `prefix`; returns its summary (rank 0; others null).
    JobModel model;  // loaded by the first run, kept for the next compressions
    auto run = [&](GenerateJob job, const std::string& prefix) -> nlohmann::json {
      for (const auto& c : cases) job.prompts.push_back(c.prompt);
      ProgressBar bar(lead && !a->quiet);
      Progress p;
      p.windows_total = int(cases.size());
      p.tokens_total = int64_t(cases.size()) * job.max_new_tokens;
      const GenerateJobResult r = runGenerateJob(
          job, &topo,
          [&](int sequence, int, const std::string&) {
            p.windows_done = sequence, p.tokens_done += 1;
            bar.update(p);
          },
          &model);
      bar.finish();
      if (!lead) return nullptr;

      std::map<std::pair<int, int>, Cell> cells;  // (length index, depth index)
      std::ofstream csv(prefix + ".csv");
      csv << "length,depth,trial,key,prompt_tokens,answer,exact_match,partial_match\n";
      nlohmann::json case_list = nlohmann::json::array();
      double exact = 0, partial = 0;
      for (size_t i = 0; i < cases.size(); ++i) {
        const PasskeyCase& c = cases[i];
        const std::string& answer = r.sequences[i].text;
        const double e = passkeyExactMatch(c.key, answer), m = passkeyPartialMatch(c.key, answer);
        const size_t li = size_t(std::find(grid.lengths.begin(), grid.lengths.end(), c.length) - grid.lengths.begin());
        const int di = int(std::lround(c.depth * (grid.depths - 1)));
        Cell& cell = cells[{int(li), di}];
        cell.exact += e, cell.partial += m, cell.n += 1;
        exact += e, partial += m;
        csv << csvLine({std::to_string(c.length), std::to_string(c.depth), std::to_string(c.trial), c.key,
                        std::to_string(c.prompt_tokens), answer, std::to_string(e), std::to_string(m)})
            << "\n";
        case_list.push_back({{"length", c.length}, {"depth", c.depth}, {"key", c.key}, {"answer", answer}, {"exact_match", e},
                             {"partial_match", m}});
      }
      if (!csv) throw Error("cannot write '" + prefix + ".csv'");
      const double n = double(cases.size());
      nlohmann::json summary = {{"model", r.model},
                                {"kv", r.kv},
                                {"exact_match", exact / n},
                                {"partial_match", partial / n},
                                {"cases", cases.size()},
                                {"lengths", grid.lengths},
                                {"depths", grid.depths},
                                {"trials", grid.trials},
                                {"kv_bytes_peak", r.kv_bytes_peak},
                                {"kv_bytes_full", r.kv_bytes_full},
                                {"kv_ratio", r.kv_bytes_full ? double(r.kv_bytes_peak) / double(r.kv_bytes_full) : 0.0},
                                {"kv_bytes_steady", r.kv_bytes_steady},
                                {"kv_steady_ratio", r.kv_bytes_full ? double(r.kv_bytes_steady) / double(r.kv_bytes_full) : 0.0},
                                {"tp", r.tp},
                                {"device", job.device},
                                {"seconds", r.seconds}};
      std::ofstream(prefix + ".json") << nlohmann::json{{"summary", summary}, {"cases", case_list}}.dump(
                                             1, ' ', false, nlohmann::json::error_handler_t::replace)
                                      << "\n";
      char title[256];
      std::snprintf(title, sizeof title, "passkey: %s, KV %s (held %.0f%%, peak %.0f%% of fp16)", r.model.c_str(),
                    r.kv.c_str(), 100 * summary["kv_steady_ratio"].get<double>(), 100 * summary["kv_ratio"].get<double>());
      if (!a->json) {
        std::printf("%s\nexact match (%%), prompt length (tokens) by key depth:\n%8s", title, "length");
        for (int d = 0; d < grid.depths; ++d) std::printf(" %5.0f%%", grid.depths == 1 ? 0.0 : 100.0 * d / (grid.depths - 1));
        std::printf("\n");
        for (size_t l = 0; l < grid.lengths.size(); ++l) {
          std::printf("%8d", grid.lengths[l]);
          for (int d = 0; d < grid.depths; ++d) std::printf(" %6.0f", 100 * cells[{int(l), d}].exact / cells[{int(l), d}].n);
          std::printf("\n");
        }
        std::printf("exact match %.1f %%, partial match %.1f %% over %zu cases\n", 100 * exact / n, 100 * partial / n,
                    cases.size());
      }
      plot(prefix, grid.lengths, grid.depths, cells, title, a->json ? stderr : stdout);
      return summary;
    };
    if (a->specs.empty()) {
      const nlohmann::json summary = run(a->job, a->out);
      if (lead && a->json) std::cout << summary.dump() << std::endl;
      return;
    }
    // Several compressions: each run as above, then a row each in PREFIX-summary.csv.
    if (!a->job.kv.empty() || !a->job.kv_quant.empty() || !a->job.kv_lowrank.empty())
      throw Error("give the compressions either as --specs or as --kv / --kv-quant / --kv-lowrank, not both");
    nlohmann::json runs = nlohmann::json::array();
    std::stringstream list(a->specs);
    int n = 0;
    for (std::string spec; std::getline(list, spec, ';');) {
      if (spec.empty()) continue;
      GenerateJob job = a->job;
      const size_t bar = spec.find('|');
      job.kv = spec.substr(0, bar) == "full" ? "" : spec.substr(0, bar);
      job.kv_quant = bar == std::string::npos ? "" : spec.substr(bar + 1);
      nlohmann::json summary = run(job, a->out + "-" + std::to_string(++n));
      if (lead) summary["label"] = spec, runs.push_back(summary);
    }
    if (!lead) return;
    std::ofstream table(a->out + "-summary.csv");
    table << "label,kv,exact_match,partial_match,kv_steady_ratio,kv_ratio,files\n";
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& r = runs[i];
      table << csvLine({r["label"], r["kv"], std::to_string(r["exact_match"].get<double>()),
                        std::to_string(r["partial_match"].get<double>()), std::to_string(r["kv_steady_ratio"].get<double>()),
                        std::to_string(r["kv_ratio"].get<double>()), a->out + "-" + std::to_string(i + 1)})
            << "\n";
    }
    if (!table) throw Error("cannot write '" + a->out + "-summary.csv'");
    if (a->json) std::cout << nlohmann::json{{"runs", runs}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                           << std::endl;
    else std::printf("wrote %s-summary.csv (%zu runs)\n", a->out.c_str(), runs.size());
  });
}

}  // namespace kvtp::launcher
