#include "launcher/sweep.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "launcher/gnuplot.h"
#include "runtime/config.h"
#include "runtime/error.h"
#include "runtime/presets.h"

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

// As the CSV has always written numbers (the stream's default: 6 significant digits).
template <class T>
std::string number(T v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

}  // namespace

void addSweepGridOptions(CLI::App* cmd, SweepGrid& g) {
  cmd->add_option("--methods", g.methods,
                  "eviction methods (comma-separated), each run at every budget; 'all': every method of docs/KV.md "
                  "(those that compress a prompt only with --prefill, qfilters where the model has qfilters.json)");
  cmd->add_option("--budgets", g.budgets, "budgets (fractions of the full cache, comma-separated)");
  cmd->add_option("--quants", g.quants, "quantizations run alone (semicolon-separated specs)");
  cmd->add_option("--extra", g.extra, "more runs, semicolon-separated, each 'KV' or 'KV|QUANT'");
  cmd->add_option("--ladder", g.ladder, "tiered precision: every method and budget again with this ladder (e.g. fp16/int8/int4/int2)");
  cmd->add_flag("--caps", g.caps,
                "budgets are memory caps: each run may hold that share of a whole window's full cache (bytes=), "
                "so the cache is whole until it fills the cap; without it, each keeps that share of the tokens "
                "seen (budget=)");
}

SweepContext sweepContext(const PplJob& base, bool caps) {
  SweepContext c;
  c.prompt = base.prefill > 0;
  c.query_filters =
      !base.model_dir.empty() && std::filesystem::exists(std::filesystem::path(base.model_dir) / "qfilters.json");
  if (!caps) return c;  // (a sweep submitted to a coordinator may name a model this machine lacks)
  ModelConfig m = base.model_dir.empty() ? syntheticConfig(base.synthetic) : loadConfig(base.model_dir);
  if (base.layers > 0) m.layers = base.layers;
  c.window_cache_bytes = kv::fullCacheBytes(std::min(base.seq_len, m.max_positions), m.layers, m.kv_heads, m.head_dim);
  return c;
}

std::vector<SweepRun> sweepRuns(const SweepGrid& g, const SweepContext& context) {
  // A budget as a spec's option: a share of the tokens seen, or a cap of bytes.
  auto budget = [&](const std::string& b) {
    if (!g.caps) return "budget=" + b;
    double share = 0;
    try {
      share = std::stod(b);
    } catch (const std::exception&) {
      throw Error("--budgets: '" + b + "' is not a number");
    }
    return "bytes=" + std::to_string(std::llround(share * double(context.window_cache_bytes)));
  };
  std::vector<SweepRun> runs = {{"full", "", ""}};
  // SnapKV, PyramidKV, noncausal, compactor and Finch decide at the prompt's end: without one
  // (--prefill) they would compress nothing, so 'all' leaves them out.
  const std::string methods = g.methods != "all" ? g.methods
                              : std::string("streamingllm,h2o,scissorhands,tova,knorm,keydiff,lagkv,leverage,cur,expected,random") +
                                    (context.query_filters ? ",qfilters" : "") +
                                    (context.prompt ? ",snapkv,pyramidkv,noncausal,compactor,finch" : "");
  for (auto& m : split(methods, ','))
    for (auto& b : split(g.budgets, ',')) runs.push_back({m, m + ":" + budget(b), ""});
  if (!g.ladder.empty())
    for (auto& m : split(methods, ','))
      for (auto& b : split(g.budgets, ','))
        runs.push_back({m + " tiered", m + ":" + budget(b) + ",ladder=" + g.ladder, ""});
  for (auto& q : split(g.quants, ';')) runs.push_back({q, "", q});
  for (auto& e : split(g.extra, ';')) {
    const auto bar = e.find('|');
    const std::string kv = e.substr(0, bar), quant = bar == std::string::npos ? "" : e.substr(bar + 1);
    runs.push_back({kv + (quant.empty() ? "" : " + " + quant), kv, quant});  // its own line in the plot
  }
  return runs;
}

std::string csvLine(const std::vector<std::string>& fields) {
  std::string line;
  for (size_t i = 0; i < fields.size(); ++i) {
    const std::string& f = fields[i];
    if (i) line += ',';
    if (f.find_first_of(",\"\r\n") == std::string::npos) {
      line += f;
      continue;
    }
    line += '"';
    for (char c : f) line += c == '"' ? std::string("\"\"") : std::string(1, c);
    line += '"';
  }
  return line;
}

SweepFiles::SweepFiles(const std::string& prefix) : prefix_(prefix) {
  std::ofstream csv(prefix + ".csv");
  if (!csv) throw Error("cannot write '" + prefix + ".csv'");
  csv << "label,kv,kv_quant,ppl,tokens,kv_bytes_peak,kv_bytes_full,kv_ratio,seconds,kv_bytes_steady,kv_steady_ratio\n";
}

void SweepFiles::add(const SweepRun& run, const nlohmann::json& r) {
  std::ofstream csv(prefix_ + ".csv", std::ios::app);  // each row lands as soon as its run ends
  csv << csvLine({run.label, run.kv, run.quant, number(r["ppl"].get<double>()), number(r["tokens"].get<int64_t>()),
                  number(r["kv_bytes_peak"].get<int64_t>()), number(r["kv_bytes_full"].get<int64_t>()),
                  number(r["kv_ratio"].get<double>()), number(r["seconds"].get<double>()),
                  number(r["kv_bytes_steady"].get<int64_t>()), number(r["kv_steady_ratio"].get<double>())})
      << "\n";
  if (!csv) throw Error("cannot write '" + prefix_ + ".csv'");
  points_.push_back({run.label, 100 * r["kv_steady_ratio"].get<double>(), r["ppl"].get<double>()});
}

void SweepFiles::finish() {
  // One gnuplot data block per label, its points sorted by memory: the script reads no CSV.
  std::vector<std::string> labels;
  for (auto& p : points_)
    if (std::find(labels.begin(), labels.end(), p.label) == labels.end()) labels.push_back(p.label);
  std::ofstream gp(prefix_ + ".gp");
  gp << "set terminal pngcairo size 900,750\nset output " << gnuplotString(prefix_ + ".png") << "\n"
     << "set xlabel 'KV cache held between steps (% of the full fp16 cache)'\nset ylabel 'perplexity'\nset key below\n"
     << "set grid\nset xrange [0:105]\n";
  for (size_t i = 0; i < labels.size(); ++i) {
    std::vector<Point> line;
    for (auto& p : points_)
      if (p.label == labels[i]) line.push_back(p);
    std::stable_sort(line.begin(), line.end(), [](const Point& a, const Point& b) { return a.held < b.held; });
    gp << "$run" << i << " << EOD\n";
    for (auto& p : line) gp << p.held << " " << p.ppl << "\n";
    gp << "EOD\n";
  }
  gp << "plot";
  for (size_t i = 0; i < labels.size(); ++i)
    gp << (i ? ", \\\n     " : " ") << "$run" << i << " using 1:2 with linespoints title " << gnuplotString(labels[i]);
  gp << "\n";
  gp.close();
  if (runGnuplot(prefix_ + ".gp"))
    std::printf("wrote %s.csv and %s.png\n", prefix_.c_str(), prefix_.c_str());
  else
    std::printf("wrote %s.csv (no PNG: gnuplot failed or is missing)\n", prefix_.c_str());
}

}  // namespace kvtp::launcher
