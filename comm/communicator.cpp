#include "comm/communicator.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>

namespace kvtp::comm {
namespace {

class SingleProcess : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allReduceSum(float*, size_t) override {}
  void allReduceSum(double*, size_t) override {}
  void allReduceMax(double*, size_t) override {}
  void allGather(const void* send, size_t bytes, void* recv) override { std::memcpy(recv, send, bytes); }
  void broadcast(void*, size_t, int) override {}
  void broadcastIdle(void*, size_t, int) override {}
  void barrier() override {}
  std::unique_ptr<Communicator> duplicate() override { return std::make_unique<SingleProcess>(); }
};

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw std::runtime_error(std::string(what) + " failed: " + std::string(msg, size_t(len)));
  }
}

// MPI counts are int: move large buffers in chunks.
template <class F>
void chunked(size_t n, F&& f) {
  constexpr size_t kMax = size_t(1) << 30;
  for (size_t off = 0; off < n; off += kMax) f(off, int(std::min(kMax, n - off)));
}

class Mpi : public Communicator {
 public:
  explicit Mpi(MPI_Comm c) : comm_(c) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~Mpi() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allReduceSum(float* d, size_t n) override {
    chunked(n, [&](size_t off, int c) { check(MPI_Allreduce(MPI_IN_PLACE, d + off, c, MPI_FLOAT, MPI_SUM, comm_), "MPI_Allreduce"); });
  }
  void allReduceSum(double* d, size_t n) override {
    chunked(n, [&](size_t off, int c) { check(MPI_Allreduce(MPI_IN_PLACE, d + off, c, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce"); });
  }
  void allReduceMax(double* d, size_t n) override {
    chunked(n, [&](size_t off, int c) { check(MPI_Allreduce(MPI_IN_PLACE, d + off, c, MPI_DOUBLE, MPI_MAX, comm_), "MPI_Allreduce"); });
  }
  void allGather(const void* send, size_t bytes, void* recv) override {
    if (bytes > size_t(1) << 30) throw std::runtime_error("allGather: more than 1 GiB per rank");
    check(MPI_Allgather(send, int(bytes), MPI_BYTE, recv, int(bytes), MPI_BYTE, comm_), "MPI_Allgather");
  }
  void broadcast(void* d, size_t bytes, int root) override {
    chunked(bytes, [&](size_t off, int c) {
      check(MPI_Bcast(static_cast<char*>(d) + off, c, MPI_BYTE, root, comm_), "MPI_Bcast");
    });
  }
  void broadcastIdle(void* d, size_t bytes, int root) override {
    if (bytes > size_t(1) << 30) throw std::runtime_error("broadcastIdle: more than 1 GiB");
    MPI_Request req;
    check(MPI_Ibcast(d, int(bytes), MPI_BYTE, root, comm_, &req), "MPI_Ibcast");
    for (int done = 0;;) {
      check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (done) return;
      usleep(2000);
    }
  }
  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }
  std::unique_ptr<Communicator> duplicate() override {
    MPI_Comm d;
    check(MPI_Comm_dup(comm_, &d), "MPI_Comm_dup");
    return std::make_unique<Mpi>(d);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

bool launchedByMpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

// MPI is finalised once, after everything that used it, when the process exits normally.
void ensureMpi() {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  });
}

std::string hostName() {
  char h[256] = {};
  gethostname(h, sizeof h - 1);
  return h;
}


}  // namespace

std::unique_ptr<Communicator> makeSingleProcess() { return std::make_unique<SingleProcess>(); }

std::string Topology::prefix() const {
  return "[rank " + std::to_string(world_rank) + "/" + std::to_string(world_size) + "]";
}

Topology Topology::groupOnly() const {
  Topology t;
  t.world = group->duplicate();
  t.group = group->duplicate();
  t.tp = tp;
  t.world_rank = world_rank;
  t.world_size = world_size;
  t.mpi = mpi;
  t.host = host;
  return t;
}

Topology makeTopology(int tp) {
  Topology t;
  t.host = hostName();
  if (!launchedByMpirun()) {
    if (tp > 1) throw std::runtime_error("--tp " + std::to_string(tp) + " needs " + std::to_string(tp) +
                                         " processes: launch with mpirun -np " + std::to_string(tp));
    t.world = makeSingleProcess();
    t.group = makeSingleProcess();
    return t;
  }
  ensureMpi();
  t.mpi = true;
  t.world = std::make_unique<Mpi>(MPI_COMM_WORLD);
  const int world = t.world->size();
  t.world_rank = t.world->rank();
  t.world_size = world;
  t.tp = tp <= 0 ? world : tp;
  if (world % t.tp != 0)
    throw std::runtime_error("world size " + std::to_string(world) + " is not a multiple of --tp " + std::to_string(t.tp));
  t.dp = world / t.tp;
  t.group_index = t.world->rank() / t.tp;
  MPI_Comm g;
  check(MPI_Comm_split(MPI_COMM_WORLD, t.group_index, t.world->rank(), &g), "MPI_Comm_split");
  t.group = std::make_unique<Mpi>(g);
  return t;
}

void abortJob(const std::string& message) {
  int init = 0, finalized = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&finalized);
  if (init && !finalized) {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    std::fprintf(stderr, "[rank %d/%d] kvtp: error: %s\n", rank, size, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  std::fprintf(stderr, "kvtp: error: %s\n", message.c_str());
  std::exit(1);
}

void agreeOrThrow(Communicator& comm, const std::string& local_error) {
  constexpr size_t kLen = 1024;
  std::vector<char> mine(kLen, 0), all(kLen * size_t(comm.size()));
  std::memcpy(mine.data(), local_error.data(), std::min(local_error.size(), kLen - 1));
  comm.allGather(mine.data(), kLen, all.data());
  for (int r = 0; r < comm.size(); ++r) {
    const char* e = all.data() + size_t(r) * kLen;
    if (*e) throw std::runtime_error(comm.size() > 1 ? "rank " + std::to_string(r) + ": " + e : std::string(e));
  }
}

void checkSameOnAllRanks(Communicator& comm, const std::string& what, const std::string& blob) {
  const uint64_t mine = std::hash<std::string>{}(blob);
  std::vector<uint64_t> all(size_t(comm.size()));
  comm.allGather(&mine, sizeof mine, all.data());
  for (int r = 1; r < comm.size(); ++r)
    if (all[r] != all[0])
      throw std::runtime_error(what + " differs between rank 0 and rank " + std::to_string(r) +
                               ": every rank must be given the same");
}

}  // namespace kvtp::comm
