// Checked CUDA / cuBLAS calls and RAII owners for device memory, streams and cuBLAS handles.
// Every failure names the host, file, line and the library's own message (as nccl-tests do).
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace kvtp::cuda {

// Element conversions shared by the kernels (float math, narrow storage).
__host__ __device__ inline float toFloat(float x) { return x; }
__host__ __device__ inline float toFloat(__half x) { return __half2float(x); }
__host__ __device__ inline float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__host__ __device__ inline T fromFloat(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}
// cuBLAS's name for a storage type.
template <class T>
cudaDataType_t dataType() {
  if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else return CUDA_R_32F;
}

inline std::string where(const char* file, int line) {
  char host[128] = {};
  gethostname(host, sizeof host - 1);
  return std::string(host) + " " + file + ":" + std::to_string(line) + ": ";
}

#define KVTP_CUDA_CHECK(call)                                                                          \
  do {                                                                                                 \
    const cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess)                                                                             \
      throw std::runtime_error(::kvtp::cuda::where(__FILE__, __LINE__) + #call + ": " + cudaGetErrorString(e_)); \
  } while (0)

#define KVTP_CUBLAS_CHECK(call)                                                                        \
  do {                                                                                                 \
    const cublasStatus_t s_ = (call);                                                                  \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                                   \
      throw std::runtime_error(::kvtp::cuda::where(__FILE__, __LINE__) + #call + ": " + cublasGetStatusString(s_)); \
  } while (0)

// After a kernel launch: launch errors now, execution errors at the next synchronisation.
#define KVTP_CUDA_LAUNCHED() KVTP_CUDA_CHECK(cudaGetLastError())

// Streaming multiprocessors of the calling thread's device, asked once per thread (launch
// shapes on the decode hot path depend on it).
inline int multiprocessors() {
  static thread_local const int n = [] {
    int device = 0, count = 0;
    KVTP_CUDA_CHECK(cudaGetDevice(&device));
    KVTP_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }();
  return n;
}

// Number of usable devices; 0 (not an error) on a machine without a GPU or driver.
inline int deviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

// Bytes held by DeviceBuffers of this process, now and at most (the measured memory peak), and
// how many times a buffer was allocated or freed (a captured CUDA graph is valid while it stays).
struct DeviceMemory {
  static inline std::atomic<int64_t> current{0}, peak{0}, changes{0};
  static void add(int64_t bytes) {
    ++changes;
    const int64_t now = current += bytes;
    for (int64_t p = peak.load(); now > p && !peak.compare_exchange_weak(p, now);) {
    }
  }
};

template <class T>
class DeviceBuffer {
 public:
  using value_type = T;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (!n) return;
    const cudaError_t e = cudaMalloc(&p_, n * sizeof(T));
    if (e == cudaErrorMemoryAllocation) {  // what was asked and what was there: the fix is in those numbers
      cudaGetLastError();
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      const int64_t held = DeviceMemory::current.load();
      throw std::runtime_error(where(__FILE__, __LINE__) + "out of device memory: a buffer of " +
                               std::to_string((n * sizeof(T)) >> 20) + " MiB asked, " + std::to_string(free >> 20) +
                               " MiB free of " + std::to_string(total >> 20) + " (" + std::to_string(held >> 20) +
                               " MiB held by this process's buffers)");
    }
    KVTP_CUDA_CHECK(e);
    DeviceMemory::add(int64_t(n * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() {
    if (p_) {
      cudaFree(p_);
      DeviceMemory::add(-int64_t(n_ * sizeof(T)));
    }
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    if (host.size() != n_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    KVTP_CUDA_CHECK(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    KVTP_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Grow-only scratch: reallocates only when `n` elements do not fit, so a steady state allocates
// nothing. Returns the (possibly new) pointer.
template <class T>
T* grow(DeviceBuffer<T>& b, size_t n) {
  if (b.size() < n) b = DeviceBuffer<T>(n);
  return b.get();
}

// grow() with a quarter more room than asked, for scratch sized by a count that rises step by step
// (a decision's table of cache entries): every allocation frees and waits for the device and makes
// the decode step's CUDA graph be captured again (DeviceMemory::changes), which an allocation per
// step would do every step.
template <class T>
T* growWithHeadroom(DeviceBuffer<T>& b, size_t n) {
  if (b.size() < n) b = DeviceBuffer<T>(n + n / 4);
  return b.get();
}

// Kernels, copies, cuBLAS and NCCL all run on the calling thread's default stream
// (CUDA_API_PER_THREAD_DEFAULT_STREAM, set by the build): unlike the legacy stream it can be
// captured into a CUDA graph.
class Blas {
 public:
  Blas() {
    KVTP_CUBLAS_CHECK(cublasCreate(&h_));
    KVTP_CUBLAS_CHECK(cublasSetStream(h_, cudaStreamPerThread));
  }
  ~Blas() { cublasDestroy(h_); }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// Replays a captured sequence of launches (a decode step's layers) as one CUDA graph: one
// launch instead of hundreds, no gaps between kernels. The launches are captured the second
// time `run` sees the same key and no device buffer changed in between (the first run
// allocates the workspaces the capture then reuses), and replayed while both hold.
class GraphReplay {
 public:
  GraphReplay() = default;
  GraphReplay(const GraphReplay&) = delete;
  GraphReplay& operator=(const GraphReplay&) = delete;
  ~GraphReplay() { reset(); }

  // Returns true when it replayed (`launches` did not run on the host).
  template <class F>
  bool run(int64_t key, F&& launches) {
    const int64_t changes = DeviceMemory::changes.load();
    if (exec_ && key == key_ && changes == changes_) {
      KVTP_CUDA_CHECK(cudaGraphLaunch(exec_, cudaStreamPerThread));
      return true;
    }
    reset();
    if (key != seen_key_ || changes != seen_changes_) {  // first sight: run plainly (it may allocate)
      launches();
      seen_key_ = key, seen_changes_ = DeviceMemory::changes.load();
      return false;
    }
    KVTP_CUDA_CHECK(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal));
    try {
      launches();
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(cudaStreamPerThread, &broken);
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    cudaGraph_t graph = nullptr;
    KVTP_CUDA_CHECK(cudaStreamEndCapture(cudaStreamPerThread, &graph));
    const cudaError_t made = cudaGraphInstantiate(&exec_, graph, 0);
    cudaGraphDestroy(graph);
    KVTP_CUDA_CHECK(made);
    key_ = key, changes_ = DeviceMemory::changes.load();
    KVTP_CUDA_CHECK(cudaGraphLaunch(exec_, cudaStreamPerThread));
    return false;
  }

 private:
  void reset() {
    if (exec_) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
  }
  cudaGraphExec_t exec_ = nullptr;
  int64_t key_ = -1, changes_ = -1, seen_key_ = -1, seen_changes_ = -1;
};

// GPU time spent between pairs of marks on the calling thread's stream (the engine marks each
// collective before and after), recorded so that a step captured into a CUDA graph records them
// again on every replay. Read once the step's work is complete.
class StreamTimer {
 public:
  StreamTimer() = default;
  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;
  ~StreamTimer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  void mark() {
    if (used_ == events_.size()) {  // grows on plain runs only: a captured step reuses these
      cudaEvent_t e = nullptr;
      KVTP_CUDA_CHECK(cudaEventCreate(&e));
      events_.push_back(e);
    }
    // While a graph is being captured, an external event becomes a node that records on every
    // replay (the flag is refused outside a capture).
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    KVTP_CUDA_CHECK(cudaStreamIsCapturing(cudaStreamPerThread, &capturing));
    const unsigned flags = capturing == cudaStreamCaptureStatusActive ? cudaEventRecordExternal : cudaEventRecordDefault;
    KVTP_CUDA_CHECK(cudaEventRecordWithFlags(events_[used_++], cudaStreamPerThread, flags));
  }
  size_t marks() const { return used_; }
  void replayed(size_t marks) { used_ = marks; }  // a graph replay recorded the marks it captured
  // Adds the marked intervals of the completed step and starts counting afresh.
  void collect() {
    for (size_t i = 0; i + 1 < used_; i += 2) {
      float ms = 0;
      KVTP_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]));
      seconds_ += ms * 1e-3;
    }
    used_ = 0;
  }
  double seconds() const { return seconds_; }

 private:
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0;
  double seconds_ = 0;
};

}  // namespace kvtp::cuda
