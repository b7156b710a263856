#include "comm/nccl_communicator.h"

#include "kernels/cuda/cuda_util.h"

#include <nccl.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace kvtp::comm {
namespace {

#define NCCL_CHECK(call)                                                                                 \
  do {                                                                                                   \
    const ncclResult_t r_ = (call);                                                                      \
    if (r_ != ncclSuccess)                                                                               \
      throw std::runtime_error(::kvtp::cuda::where(__FILE__, __LINE__) + #call + ": " + ncclGetErrorString(r_)); \
  } while (0)
#define CUDA_CHECK KVTP_CUDA_CHECK

class Nccl : public Communicator {
 public:
  Nccl(ncclComm_t comm, int device) : comm_(comm), device_(device) {
    CUDA_CHECK(cudaSetDevice(device_));
    NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    NCCL_CHECK(ncclCommCount(comm_, &size_));
    CUDA_CHECK(cudaMalloc(&scratch_, 64));
  }
  ~Nccl() override {
    cudaFree(scratch_);
    ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allReduceSum(float* d, size_t n) override { run(ncclAllReduce(d, d, n, ncclFloat32, ncclSum, comm_, stream_)); }
  void allReduceSum(double* d, size_t n) override { run(ncclAllReduce(d, d, n, ncclFloat64, ncclSum, comm_, stream_)); }
  void allReduceMax(double* d, size_t n) override { run(ncclAllReduce(d, d, n, ncclFloat64, ncclMax, comm_, stream_)); }
  void allGather(const void* send, size_t bytes, void* recv) override {
    run(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_));
  }
  void broadcast(void* d, size_t bytes, int root) override { run(ncclBroadcast(d, d, bytes, ncclUint8, root, comm_, stream_)); }
  void broadcastIdle(void* d, size_t bytes, int root) override { broadcast(d, bytes, root); }
  void barrier() override {
    run(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  std::unique_ptr<Communicator> duplicate() override {
    ncclComm_t d;
    NCCL_CHECK(ncclCommSplit(comm_, 0, rank_, &d, nullptr));
    return std::make_unique<Nccl>(d, device_);
  }

 private:
  void run(ncclResult_t launched) { NCCL_CHECK(launched); }
  ncclComm_t comm_;
  int device_;
  // The calling thread's default stream, where the CUDA engine's kernels run: collectives are
  // ordered with them without the host waiting (a host wait per all-reduce drains the GPU's queue
  // of launches), and a decode step's all-reduces are captured into its CUDA graph with them.
  const cudaStream_t stream_ = cudaStreamPerThread;
  int rank_ = 0, size_ = 1;
  float* scratch_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> makeNccl(Communicator& bootstrap, int device) {
  CUDA_CHECK(cudaSetDevice(device));
  ncclUniqueId id;
  if (bootstrap.rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  bootstrap.broadcast(&id, sizeof id, 0);  // host memory: the bootstrap is MPI
  ncclComm_t comm;
  NCCL_CHECK(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()));
  auto nccl = std::make_unique<Nccl>(comm, device);
  // NCCL connects its peers lazily, at the first collective of each kind and size class: do it
  // now, so that the first timed step of a job does not pay for it.
  cuda::DeviceBuffer<float> warm(size_t(1) << 22);
  nccl->allReduceSum(warm.get(), warm.size());
  nccl->allReduceSum(warm.get(), 1);
  nccl->allGather(warm.get(), 64, warm.get() + 1024);
  nccl->barrier();
  return nccl;
}

}  // namespace kvtp::comm
