// The CUDA engine: the forward pass of runtime/model.cpp on one GPU, weights in fp16, bf16 or
// fp32 (accumulation always fp32), the residual stream in fp32, and the KV cache in GPU memory
// laid out [layer][kv_head][capacity][head_dim] so that each head's rows are contiguous; heads
// keep different tokens once compressed (kv::Policy decides on the host over a mirror of the
// positions, the device compacts).
// Tensor parallel over a device communicator (NCCL): the same sharding as the CPU model, whose
// host weights the engine uploads (and converts) once.
#pragma once
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "kv/policy.h"
#include "runtime/engine.h"

namespace kvtp {

enum class Precision { F32, F16, BF16 };  // what weights and matrix inputs are stored in
Precision parsePrecision(const std::string& s);  // fp32 | fp16 | bf16
const char* precisionName(Precision d);

struct GpuOptions {
  Precision dtype = Precision::F16;
  int device = 0;
  // Collectives over device memory among the tensor-parallel ranks (comm::makeNccl); null when
  // tp = 1. Must join the same ranks, in the same order, as the host model's group.
  comm::Communicator* device_group = nullptr;
  // KV compression (every method and storage of the catalogue: docs/KV.md, "On the GPU") and the
  // host group its budget is settled over.
  kv::PolicySpec kv;
  comm::Communicator* host_group = nullptr;
  // Q-Filters: per (layer, local KV head) its filter (queryFiltersFor), decided on the device.
  std::vector<std::vector<float>> query_filters;
  // Measure the GPU time inside the collectives (collectiveSeconds) with CUDA events around each;
  // the events cost time of their own (about 0.7 ms a decode step at tp 2 on a 7B shape).
  bool time_collectives = false;
  // Measure each phase of compress() (decisionPhaseSeconds): the host waits for the device at
  // every phase's end, so the phases add up to more than the decision takes without it.
  bool time_decision_phases = false;
};


// How many GPUs this process sees (0 in a build without the CUDA backend).
int cudaDevices();

// This rank's weights come from `source` a layer at a time (uploaded and converted as they come).
// Throws Error for what the CUDA backend does not do (unsupported head_dim).
std::unique_ptr<Engine> makeGpuEngine(const ModelConfig& config, const Partition& part, const WeightSource& source,
                                      const GpuOptions& options);

// The most device memory this process's buffers held at once (weights, cache, workspaces;
// cuBLAS's and NCCL's own workspaces not included), bytes.
int64_t deviceBytesPeak();
// What they hold now, bytes.
int64_t deviceBytesHeld();

// An NCCL communicator over the ranks of `host_group` (MPI), on `device`.
std::unique_ptr<comm::Communicator> makeDeviceGroup(comm::Communicator& host_group, int device);

// The device's peak memory bandwidth in bytes/s (memory clock x bus width x 2, DDR).
double peakMemoryBandwidth(int device);

// The device this process should use: its local rank on the node under mpirun, modulo the
// device count.
int localDevice();

}  // namespace kvtp
