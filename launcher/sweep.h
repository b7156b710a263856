// A sweep: perplexity against KV memory over a grid of compression specs on one model and data
// set — the runs it makes, and the CSV + PNG it writes. Shared by `kvtp sweep` (runs it here),
// `kvtp submit sweep` (a job array on a coordinator) and `kvtp sweep --array` (the array's files),
// so a sweep gives the same files wherever it ran.
#pragma once
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "runtime/ppl_job.h"

namespace kvtp::launcher {

struct SweepGrid {
  std::string methods = "streamingllm,h2o,scissorhands", budgets = "0.1,0.2,0.5", quants = "int8;kivi:bits=4;kivi:bits=2";
  std::string extra;
  std::string ladder;  // tiered precision: every method and budget again with ladder=LADDER (its own line)
  bool caps = false;   // budgets are memory caps (bytes=) instead of shares of the tokens seen (budget=)
};
void addSweepGridOptions(CLI::App* cmd, SweepGrid& g);

struct SweepRun {
  std::string label, kv, quant;  // label: the run's line in the plot (a method, a quantization, a combination)
};
// What the runs of a sweep depend on besides its grid (sweepContext: from the perplexity job; the
// model's config is read only for caps).
struct SweepContext {
  bool prompt = false;             // the windows start with a prompt (--prefill): 'all' has the prompt methods
  bool query_filters = false;      // the model has Q-Filters calibrated (qfilters.json): 'all' has qfilters
  int64_t window_cache_bytes = 0;  // one window's full fp16 cache, all layers and KV heads (caps are shares of it)
};
SweepContext sweepContext(const PplJob& base, bool caps);
// The full cache, every method at every budget (and again with the ladder), each quantization
// alone, then the extra runs.
std::vector<SweepRun> sweepRuns(const SweepGrid& g, const SweepContext& context);

// One CSV row per run from its `kvtp ppl --json` result; fields quoted per RFC 4180 where needed.
// Column names: label,kv,kv_quant,ppl,tokens,kv_bytes_peak,kv_bytes_full,kv_ratio,seconds,
// kv_bytes_steady,kv_steady_ratio.
class SweepFiles {
 public:
  explicit SweepFiles(const std::string& prefix);  // opens PREFIX.csv and writes the header
  void add(const SweepRun& run, const nlohmann::json& result);
  // Plots perplexity against the KV held (one line per label) into PREFIX.png with gnuplot and
  // says on stdout which files it wrote (no PNG where gnuplot failed or is missing).
  void finish();

 private:
  std::string prefix_;
  struct Point {
    std::string label;
    double held, ppl;
  };
  std::vector<Point> points_;
};

// A CSV line (no newline) of these fields, each quoted when it holds a comma, quote or line break.
std::string csvLine(const std::vector<std::string>& fields);

}  // namespace kvtp::launcher
