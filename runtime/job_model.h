// The model of a job as one rank runs it, and the engine over it: what the perplexity job and the
// generation job share (loading, the memory plan's inputs, GPU set-up that all ranks agree on).
#pragma once
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "runtime/engine.h"
#include "runtime/gpu_engine.h"
#include "runtime/model.h"

namespace kvtp {

// Where a job's model comes from: a Hugging Face folder, or a shape preset with random weights.
struct ModelSource {
  std::string model_dir;
  std::string synthetic;  // a preset name or config.json
  uint64_t seed = 0;      // synthetic weights' seed
  int layers = 0;         // synthetic: override num_hidden_layers (0 = the config's)
};

struct JobModel {
  std::string name;       // the folder, or "synthetic:<preset>"
  std::string directory;  // the folder (empty for synthetic weights)
  ModelConfig config;
  Partition part;
  std::unique_ptr<Model> model;  // --device cpu: the weights in host memory
  WeightSource weights;          // --device cuda: read a layer at a time as the engine uploads them
  int device = 0;                // --device cuda: this rank's GPU
};

// This rank's part of the model, loaded (cpu) or opened (cuda). A synthetic Llama's context is
// stretched to `context` tokens (RoPE has no position table: kvtp bench scores 8k windows on
// Llama-2-70B's shape). Throws Error on this rank alone (the caller agrees with the others).
JobModel openJobModel(const ModelSource& source, bool gpu, int context, comm::Communicator* group);

struct JobEngine {
  std::unique_ptr<comm::Communicator> device_group;  // NCCL, for the CUDA engine at tp > 1
  std::unique_ptr<Engine> engine;
};

// The engine over `m` with the KV policy `spec`; on the GPU every rank of `topo` learns if one
// failed (out of memory), so that none waits in a collective.
JobEngine startJobEngine(const JobModel& m, const kv::PolicySpec& spec, bool gpu, Precision dtype, bool time_collectives,
                         const comm::Topology* topo);

}  // namespace kvtp
