// Q-Filters' calibrated filters (docs/KV.md): one head_dim vector per (layer, KV head) of a model,
// from its post-RoPE queries on calibration text (`kvtp qfilters`), kept as JSON beside the model
// (qfilters.json) as the authors ship theirs per model.
#pragma once
#include <string>
#include <vector>

#include "kv/policy.h"
#include "runtime/model.h"

namespace kvtp {

struct QueryFilters {
  int layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<float> values;  // (layers, kv_heads, head_dim)
};

// The filters of a whole model (tp 1) from its queries over `windows` (each a token sequence run
// from position 0): every window runs twice, once for the queries' Gram matrices and once for
// their signs (kv::QueryFilterCalibration).
QueryFilters calibrateQueryFilters(const Model& model, const std::vector<std::vector<int>>& windows);

void saveQueryFilters(const QueryFilters& f, const std::string& path);
QueryFilters loadQueryFilters(const std::string& path);

// The file a qfilters spec reads: its filters=, else qfilters.json in the model's folder.
std::string queryFiltersPath(const kv::PolicySpec& spec, const std::string& model_dir);

// This rank's filters for kv::Policy::setQueryFilters (and the CUDA engine), per (layer, local KV
// head), after checking they fit the model.
std::vector<std::vector<float>> localQueryFilters(const QueryFilters& f, const ModelConfig& c, const Partition& part,
                                                  const std::string& source);

// What an engine under `spec` needs of them: this rank's filters for qfilters (read from
// queryFiltersPath), nothing for the other methods. `model_dir` is empty for synthetic weights.
std::vector<std::vector<float>> queryFiltersFor(const kv::PolicySpec& spec, const std::string& model_dir,
                                                const ModelConfig& c, const Partition& part);

}  // namespace kvtp
