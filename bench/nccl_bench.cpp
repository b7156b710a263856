// kvtp_nccl_bench (under mpirun, one GPU per rank): NCCL all-reduce time and bus bandwidth over
// message sizes, including the per-layer all-reduces of tensor-parallel decode and prefill
// (hidden x tokens x 4 bytes). Medians of 20 after warm-up; rank 0 prints.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_util.h"

int main() {
  using namespace kvtp;
  comm::Topology topo = comm::makeTopology(0);
  if (cuda::deviceCount() < topo.world->size()) {
    if (topo.world->rank() == 0) std::printf("kvtp_nccl_bench: needs one CUDA device per rank; nothing measured\n");
    return 0;
  }
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  auto nccl = comm::makeNccl(*topo.world, local ? std::atoi(local) : 0);
  const int n = nccl->size();
  if (topo.world->rank() == 0) std::printf("NCCL all-reduce (sum, float32), %d ranks:\n", n);
  for (size_t bytes : {size_t(9216 * 4), size_t(9216 * 8 * 4), size_t(1) << 20, size_t(9216) * 2048 * 4,
                       size_t(64) << 20, size_t(256) << 20}) {
    cuda::DeviceBuffer<float> buf(bytes / 4);
    KVTP_CUDA_CHECK(cudaMemset(buf.get(), 0, bytes));
    std::vector<double> us;
    for (int i = 0; i < 25; ++i) {
      nccl->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      nccl->allReduceSum(buf.get(), bytes / 4);
      KVTP_CUDA_CHECK(cudaDeviceSynchronize());  // collectives are stream-ordered: wait for it
      const auto t1 = std::chrono::steady_clock::now();
      if (i >= 5) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(us.begin(), us.end());
    const double med = us[us.size() / 2];
    const double busbw = double(bytes) / (med * 1e-6) * 2.0 * (n - 1) / n / 1e9;  // nccl-tests' bus bandwidth
    if (topo.world->rank() == 0)
      std::printf("  %10zu bytes  %9.1f us  bus %7.1f GB/s\n", bytes, med, busbw);
  }
  return 0;
}
