#include "runtime/query_filters.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/cpu_ops.h"
#include "kv/scorers.h"
#include "runtime/error.h"

namespace kvtp {

QueryFilters calibrateQueryFilters(const Model& model, const std::vector<std::vector<int>>& windows) {
  const ModelConfig& c = model.config();
  if (model.partition().tp != 1) throw Error("Q-Filters calibrate on one process (the whole model's heads)");
  const int hd = c.head_dim, members = c.heads / c.kv_heads;
  const std::vector<float> rope = c.family == Family::Llama ? ropeInverseFrequencies(c) : std::vector<float>{};
  std::vector<kv::QueryFilterCalibration> heads(size_t(c.layers) * c.kv_heads, kv::QueryFilterCalibration(members, hd));
  for (const bool signs : {false, true})
    for (const auto& ids : windows) {
      const int T = int(ids.size());
      std::vector<int> positions(static_cast<size_t>(T));
      for (int t = 0; t < T; ++t) positions[t] = t;
      kv::KVCache cache = model.newCache();
      kv::StepAttention step;
      step.want_probabilities = false, step.want_queries = true;
      model.forward(ids.data(), positions.data(), T, cache, &step);
#pragma omp parallel for schedule(static)
      for (int i = 0; i < int(heads.size()); ++i)
        for (int m = 0; m < members; ++m) {
          float* q = step.queries[i].data() + int64_t(m) * T * hd;  // pre-RoPE: rotated to their positions
          if (!rope.empty()) kernels::applyRope(q, T, 1, hd, positions.data(), rope.data());
          if (signs) heads[i].addSigns(m, q, T);
          else heads[i].addGram(m, q, T);
        }
    }
  QueryFilters f{c.layers, c.kv_heads, hd, {}};
  for (const auto& h : heads) {
    const std::vector<float> v = h.filter();
    f.values.insert(f.values.end(), v.begin(), v.end());
  }
  return f;
}

void saveQueryFilters(const QueryFilters& f, const std::string& path) {
  nlohmann::json j = {{"method", "qfilters"}, {"layers", f.layers}, {"kv_heads", f.kv_heads}, {"head_dim", f.head_dim},
                      {"filters", f.values}};
  std::ofstream out(path);
  if (!(out << j.dump() << "\n")) throw Error("cannot write '" + path + "'");
}

QueryFilters loadQueryFilters(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    throw Error("qfilters reads filters calibrated for the model from '" + path +
                "', which cannot be opened: make them with `kvtp qfilters --model DIR --data FILE` (docs/KV.md)");
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    QueryFilters f{j.at("layers").get<int>(), j.at("kv_heads").get<int>(), j.at("head_dim").get<int>(),
                   j.at("filters").get<std::vector<float>>()};
    if (f.layers < 1 || f.kv_heads < 1 || f.head_dim < 1 ||
        f.values.size() != size_t(f.layers) * f.kv_heads * f.head_dim)
      throw Error("'" + path + "': filters hold " + std::to_string(f.values.size()) +
                  " values, not layers x kv_heads x head_dim");
    return f;
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path + "' is not a Q-Filters file: " + e.what());
  }
}

std::string queryFiltersPath(const kv::PolicySpec& spec, const std::string& model_dir) {
  if (!spec.filters.empty()) return spec.filters;
  if (model_dir.empty())
    throw Error("qfilters needs filters calibrated for the model: give filters=FILE (a synthetic model has no folder)");
  return (std::filesystem::path(model_dir) / "qfilters.json").string();
}

std::vector<std::vector<float>> localQueryFilters(const QueryFilters& f, const ModelConfig& c, const Partition& part,
                                                  const std::string& source) {
  if (f.layers != c.layers || f.kv_heads != c.kv_heads || f.head_dim != c.head_dim)
    throw Error("'" + source + "' holds filters for " + std::to_string(f.layers) + " layers x " +
                std::to_string(f.kv_heads) + " KV heads x " + std::to_string(f.head_dim) +
                " channels, not this model's " + std::to_string(c.layers) + " x " + std::to_string(c.kv_heads) + " x " +
                std::to_string(c.head_dim));
  std::vector<std::vector<float>> local;
  for (int l = 0; l < c.layers; ++l)
    for (int h = 0; h < part.kv_heads; ++h) {
      const float* v = f.values.data() + (int64_t(l) * c.kv_heads + part.kv_head_begin + h) * c.head_dim;
      local.emplace_back(v, v + c.head_dim);
    }
  return local;
}

std::vector<std::vector<float>> queryFiltersFor(const kv::PolicySpec& spec, const std::string& model_dir,
                                                const ModelConfig& c, const Partition& part) {
  if (spec.method != kv::Method::QFilters) return {};
  const std::string path = queryFiltersPath(spec, model_dir);
  return localQueryFilters(loadQueryFilters(path), c, part, path);
}

}  // namespace kvtp
