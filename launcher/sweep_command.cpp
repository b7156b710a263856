// kvtp sweep: perplexity against KV memory for a grid of compression specs on one model and
// data set; writes a CSV and, with gnuplot, a PNG with one line per method.
#include <cstdio>
#include <fstream>
#include <algorithm>
#include <sstream>

#include "launcher/commands.h"
#include "launcher/ppl_options.h"
#include "runtime/error.h"

namespace kvtp::launcher {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

void addSweepCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "Perplexity vs KV memory over a grid of compression specs (CSV + PNG)");
  struct Args {
    PplOptions ppl;
    std::string methods = "streamingllm,h2o,scissorhands", budgets = "0.1,0.2,0.5", quants = "int8;kivi:bits=4;kivi:bits=2";
    std::string extra, out = "kv-sweep";
  };
  auto a = std::make_shared<Args>();
  addPplOptions(cmd, a->ppl);
  cmd->add_option("--methods", a->methods, "eviction methods (comma-separated), each run at every budget");
  cmd->add_option("--budgets", a->budgets, "budgets (fractions of the full cache, comma-separated)");
  cmd->add_option("--quants", a->quants, "quantizations run alone (semicolon-separated specs)");
  cmd->add_option("--extra", a->extra, "more runs, semicolon-separated, each 'KV' or 'KV|QUANT'");
  cmd->add_option("--out", a->out, "output prefix: PREFIX.csv and PREFIX.png");
  cmd->callback([a] {
    struct Run {
      std::string label, kv, quant;
    };
    std::vector<Run> runs = {{"full", "", ""}};
    for (auto& m : split(a->methods, ','))
      for (auto& b : split(a->budgets, ',')) runs.push_back({m, m + ":budget=" + b, ""});
    for (auto& q : split(a->quants, ';')) runs.push_back({q, "", q});
    for (auto& e : split(a->extra, ';')) {
      const auto bar = e.find('|');
      const std::string kv = e.substr(0, bar), quant = bar == std::string::npos ? "" : e.substr(bar + 1);
      std::string label = kv + (quant.empty() ? "" : " + " + quant);  // its own line in the plot
      std::replace(label.begin(), label.end(), ',', ' ');
      runs.push_back({label, kv, quant});
    }
    PplJob base = a->ppl.resolve();
    base.mode = Mode::Decode;
    const comm::Topology topo = comm::makeTopology(a->ppl.tp);
    const bool lead = topo.world_rank == 0;
    std::ofstream csv;
    if (lead) {
      csv.open(a->out + ".csv");
      if (!csv) throw Error("cannot write '" + a->out + ".csv'");
      csv << "label,kv,kv_quant,ppl,tokens,kv_bytes_peak,kv_bytes_full,kv_ratio,seconds,kv_bytes_steady,kv_steady_ratio\n";
    }
    for (auto& r : runs) {
      PplJob j = base;
      j.kv = r.kv;
      j.kv_quant = r.quant;
      const auto res = runPplJob(j, &topo);
      const auto js = toJson(j, res);
      if (!lead) continue;
      csv << r.label << ",\"" << r.kv << "\",\"" << r.quant << "\"," << js["ppl"].get<double>() << ","
          << js["tokens"].get<int64_t>() << "," << js["kv_bytes_peak"].get<int64_t>() << ","
          << js["kv_bytes_full"].get<int64_t>() << "," << js["kv_ratio"].get<double>() << ","
          << js["seconds"].get<double>() << "," << js["kv_bytes_steady"].get<int64_t>() << ","
          << js["kv_steady_ratio"].get<double>() << "\n";
      csv.flush();
      std::printf("%-40s ppl %9.4f  KV held %5.1f%%, peak %5.1f%% of full  (%.1f s)\n",
                  (r.kv + (r.quant.empty() ? "" : " " + r.quant)).c_str(), js["ppl"].get<double>(),
                  100 * js["kv_steady_ratio"].get<double>(), 100 * js["kv_ratio"].get<double>(), js["seconds"].get<double>());
      std::fflush(stdout);
    }
    if (!lead) return;
    csv.close();
    // One line per label (method); points sorted by memory.
    std::ofstream gp(a->out + ".gp");
    gp << "set datafile separator ','\nset terminal pngcairo size 900,750\nset output '" << a->out << ".png'\n"
       << "set xlabel 'KV cache held between steps (% of the full fp16 cache)'\nset ylabel 'perplexity'\nset key below\n"
       << "set grid\nset xrange [0:105]\nn = system(\"tail -n +2 " << a->out << ".csv | cut -d, -f1 | awk '!seen[$0]++' | wc -l\")\n"
       << "label(i) = system(sprintf(\"tail -n +2 " << a->out << ".csv | cut -d, -f1 | awk '!seen[$0]++' | sed -n %dp\", i))\n"
       << "plot for [i=1:n] sprintf(\"< grep '^%s,' " << a->out << ".csv | sort -t, -k11 -g\", label(i)) using ($11*100):4 "
       << "with linespoints title label(i)\n";
    gp.close();
    if (std::system(("gnuplot " + a->out + ".gp 2>/dev/null").c_str()) == 0)
      std::printf("wrote %s.csv and %s.png\n", a->out.c_str(), a->out.c_str());
    else
      std::printf("wrote %s.csv (no PNG: gnuplot failed or is missing)\n", a->out.c_str());
  });
}

}  // namespace kvtp::launcher
