#include "runtime/ppl_job.h"

#include <algorithm>
#include <cmath>

#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/presets.h"
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

PplJobResult runPplJob(const PplJob& job, const ProgressFn& progress) {
  if (job.model_dir.empty() == job.synthetic.empty()) throw Error("give exactly one of --model and --synthetic");
  if (job.data.empty() == job.input_ids.empty()) throw Error("give exactly one of --data and --input-ids");
  if (!job.synthetic.empty() && !job.data.empty())
    throw Error("--synthetic has no tokenizer: score --input-ids with it, not --data");

  std::unique_ptr<Model> model;
  PplJobResult out;
  if (!job.model_dir.empty()) {
    model = Model::load(job.model_dir);
    out.model = job.model_dir;
  } else {
    ModelConfig c = syntheticConfig(job.synthetic);
    model = std::make_unique<Model>(c, syntheticWeights(c, job.seed));
    out.model = "synthetic:" + job.synthetic;
  }
  const ModelConfig& c = model->config();
  out.seq_len = std::min(job.seq_len, c.max_positions);

  std::vector<Window> windows;
  int sequences = 0;
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
  if (windows.empty()) throw Error("no window of at least 2 tokens to score");
  out.windows = int(windows.size());
  out.result = scoreWindows(*model, windows, sequences, job.mode, progress);
  return out;
}

nlohmann::json toJson(const PplJob& job, const PplJobResult& r) {
  nlohmann::json seqs = nlohmann::json::array();
  for (auto& s : r.result.sequences) seqs.push_back({{"ppl", s.ppl()}, {"tokens", s.tokens}});
  return {{"ppl", r.result.ppl()},
          {"nll", r.result.nll},
          {"tokens", r.result.tokens},
          {"sequences", seqs},
          {"seconds", r.result.seconds},
          {"tokens_per_second", r.result.tokensPerSecond()},
          {"model", r.model},
          {"mode", modeName(job.mode)},
          {"seq_len", r.seq_len},
          {"stride", job.stride},
          {"windows", r.windows}};
}

}  // namespace kvtp
