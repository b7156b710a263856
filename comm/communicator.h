// Collectives behind one interface: MPI between CPU processes, NCCL between GPUs (CUDA
// backend), and a single-process communicator that makes every collective the identity.
// Collectives are blocking and must be called by every rank of the communicator in the same
// order, as in MPI.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace kvtp::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual void allReduceSum(float* data, size_t n) = 0;
  virtual void allReduceSum(double* data, size_t n) = 0;
  virtual void allReduceMax(double* data, size_t n) = 0;
  // Every rank contributes `bytes` and receives size() * bytes, in rank order.
  virtual void allGather(const void* send, size_t bytes, void* recv) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // A broadcast that may wait a long time (a worker waiting for its next job): it sleeps
  // between polls instead of spinning a core.
  virtual void broadcastIdle(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // A new communicator over the same ranks (its collectives never mix with this one's).
  virtual std::unique_ptr<Communicator> duplicate() = 0;
};

std::unique_ptr<Communicator> makeSingleProcess();

// The processes of a job: the world, and the tensor-parallel group this process belongs to.
// world size = tp x dp; group g holds world ranks [g * tp, (g + 1) * tp).
struct Topology {
  std::unique_ptr<Communicator> world;
  std::unique_ptr<Communicator> group;
  int tp = 1, dp = 1, group_index = 0;
  int world_rank = 0, world_size = 1;  // in the whole mpirun job, for log prefixes
  bool mpi = false;  // launched by mpirun
  std::string host;
  // The same process seen as a job of its own group only (world = group, dp = 1): how worker
  // groups of one mpirun launch run different jobs independently.
  Topology groupOnly() const;
  // "[rank 1/4]": the prefix of every log line of this process.
  std::string prefix() const;
};

// Under mpirun (detected from its environment) initialises MPI and splits the world into groups
// of `tp` ranks (tp <= 0: one group of the whole world); otherwise a single process. Throws if
// the world size is not a multiple of tp.
Topology makeTopology(int tp);

// Ends the whole job from one failing rank, so the others cannot hang waiting for it: prints
// the message with the rank prefix and aborts every process (MPI_Abort); exits 1 outside MPI.
[[noreturn]] void abortJob(const std::string& message);

// Every rank of `comm` reports how its local preparation went (empty = fine); if any failed,
// every rank throws the same error naming the first failing rank. Call it where ranks would
// otherwise wait forever for a rank that failed alone (a file missing on one node).
void agreeOrThrow(Communicator& comm, const std::string& local_error);

// Every rank passes the same-sized blob (a config or job digest); throws naming the first rank
// whose blob differs from rank 0's.
void checkSameOnAllRanks(Communicator& comm, const std::string& what, const std::string& blob);

}  // namespace kvtp::comm
