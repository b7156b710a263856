// What every build knows about devices and dtypes; the CUDA engine itself is gpu_engine.cu, or,
// in a build without CUDA, the clear errors at the end of this file.
#include <cmath>

#include "runtime/error.h"
#include "runtime/gpu_engine.h"

namespace kvtp {

Precision parsePrecision(const std::string& s) {
  if (s == "fp32") return Precision::F32;
  if (s == "fp16") return Precision::F16;
  if (s == "bf16") return Precision::BF16;
  throw Error("dtype '" + s + "' is not one of: fp32, fp16, bf16");
}

const char* precisionName(Precision d) { return d == Precision::F32 ? "fp32" : d == Precision::F16 ? "fp16" : "bf16"; }

#ifndef KVTP_WITH_CUDA
namespace {
[[noreturn]] void noCuda() {
  throw Error("--device cuda: this kvtp was built without the CUDA backend (configure with -DKVTP_CUDA=ON where nvcc is)");
}
}  // namespace
int cudaDevices() { return 0; }
int localDevice() { noCuda(); }
double peakMemoryBandwidth(int) { noCuda(); }
std::unique_ptr<Engine> makeGpuEngine(const ModelConfig&, const Partition&, const WeightSource&, const GpuOptions&) {
  noCuda();
}
int64_t deviceBytesPeak() { return 0; }
int64_t deviceBytesHeld() { return 0; }
std::unique_ptr<comm::Communicator> makeDeviceGroup(comm::Communicator&, int) { noCuda(); }
#endif

}  // namespace kvtp
