// kvtp qfilters: calibrates Q-Filters for a model (runtime/query_filters.h) from text the
// evaluation does not use, and writes them where `--kv qfilters` looks (the model's folder).
#include <cstdio>
#include <filesystem>

#include "launcher/commands.h"
#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/perplexity.h"
#include "runtime/query_filters.h"
#include "runtime/tokenizer.h"

namespace kvtp::launcher {

void addQueryFiltersCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand("qfilters", "Calibrate Q-Filters (--kv qfilters) for a model from sample text");
  struct Args {
    std::string model, data, input_ids, out;
    int seq_len = 1024, windows = 16;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "Hugging Face model folder")->required();
  auto* data = cmd->add_option("--data", a->data,
                               "calibration text, C4-style documents (default: the bundled C4 training sample)");
  cmd->add_option("--input-ids", a->input_ids, "or token ids, one sequence per line (a model without a tokenizer)")
      ->excludes(data);
  cmd->add_option("--seq-len", a->seq_len, "tokens per calibration window (default 1024)");
  cmd->add_option("--windows", a->windows, "calibration windows (default 16)");
  cmd->add_option("--out", a->out, "where to write them (default MODEL/qfilters.json)");
  cmd->callback([a] {
    if (a->seq_len < 2 || a->windows < 1) throw Error("--seq-len must be at least 2 and --windows at least 1");
    const auto model = Model::load(a->model);
    const int seq_len = std::min(a->seq_len, model->config().max_positions);
    std::vector<std::vector<int>> sequences;
    if (!a->input_ids.empty()) {
      sequences = readIdLines(a->input_ids);
    } else {
      std::string text;
      for (const auto& d : readDocuments(a->data.empty() ? "data/c4/c4-train-1800.json.gz" : a->data))
        text += (text.empty() ? "" : "\n\n") + d;
      sequences.push_back(loadTokenizer(a->model)->encode(text));
    }
    std::vector<std::vector<int>> windows;  // whole windows of seq_len (the ids' lines may be shorter)
    for (const auto& ids : sequences)
      for (auto& w : planWindows(ids, seq_len, 0, a->input_ids.empty()))
        if (int(windows.size()) < a->windows) windows.push_back(std::move(w.ids));  // forward checks the ids
    if (windows.empty()) throw Error("no calibration window of " + std::to_string(seq_len) + " tokens in the input");
    const std::string out = a->out.empty() ? (std::filesystem::path(a->model) / "qfilters.json").string() : a->out;
    saveQueryFilters(calibrateQueryFilters(*model, windows), out);
    std::printf("wrote %s: Q-Filters of %d layers x %d KV heads from %zu windows of up to %d tokens\n", out.c_str(),
                model->config().layers, model->config().kv_heads, windows.size(), seq_len);
  });
}

}  // namespace kvtp::launcher
