#include "runtime/job_model.h"

#include <algorithm>

#include "runtime/error.h"
#include "runtime/presets.h"
#include "runtime/query_filters.h"

namespace kvtp {

JobModel openJobModel(const ModelSource& source, bool gpu, int context, comm::Communicator* group) {
  JobModel m;
  if (!source.model_dir.empty()) {
    m.config = loadConfig(source.model_dir);
    m.name = m.directory = source.model_dir;
  } else {
    m.config = syntheticConfig(source.synthetic);
    if (source.layers > 0) m.config.layers = source.layers;
    if (m.config.family == Family::Llama) m.config.max_positions = std::max(m.config.max_positions, context);
    m.name = "synthetic:" + source.synthetic;
  }
  const ModelConfig& c = m.config;
  m.part = group ? Partition::make(c, group->rank(), group->size()) : Partition::make(c, 0, 1);
  if (gpu) m.device = localDevice();
  if (gpu)
    m.weights = source.model_dir.empty() ? syntheticSource(c, m.part, source.seed)
                                         : checkpointSource(c, m.part, source.model_dir);
  else
    m.model = source.model_dir.empty() ? Model::synthetic(c, source.seed, group) : Model::load(source.model_dir, group);
  return m;
}

JobEngine startJobEngine(const JobModel& m, const kv::PolicySpec& spec, bool gpu, Precision dtype, bool time_collectives,
                         const comm::Topology* topo) {
  JobEngine e;
  if (!gpu) {
    e.engine = makeCpuEngine(*m.model, &spec);
    return e;
  }
  comm::Communicator* group = topo ? topo->group.get() : nullptr;
  if (m.part.tp > 1) e.device_group = makeDeviceGroup(*group, m.device);
  std::string local_error;
  try {  // a rank out of GPU memory must not leave the others waiting in a collective
    e.engine = makeGpuEngine(m.config, m.part, m.weights,
                             {dtype, m.device, e.device_group.get(), spec, group,
                              queryFiltersFor(spec, m.directory, m.config, m.part), time_collectives});
  } catch (const std::exception& ex) {
    local_error = ex.what();
  }
  if (topo) comm::agreeOrThrow(*topo->world, local_error);
  else if (!local_error.empty()) throw Error(local_error);
  return e;
}

}  // namespace kvtp
