// The NCCL communicator under a real `mpirun -np N` (one GPU per rank): every collective against a
// computed expectation, as nccl-tests do. Without GPUs (CI) each test says it skipped.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <numeric>

#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_util.h"

namespace kvtp {
namespace {

using cuda::DeviceBuffer;

struct Ranks {
  comm::Topology topo = comm::makeTopology(0);
  std::unique_ptr<comm::Communicator> nccl;
  Ranks() {
    const int devices = cuda::deviceCount();
    if (devices > 0 && topo.world->size() <= devices) {
      const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
      nccl = comm::makeNccl(*topo.world, local ? std::atoi(local) : 0);
    }
  }
};

Ranks& ranks() {
  static Ranks r;
  return r;
}

#define REQUIRE_NCCL()                                                                                     \
  if (!ranks().nccl) GTEST_SKIP() << "needs one CUDA device per rank (runs on the multi-GPU machine)"

TEST(Nccl, AllReduceSumsAndMaxes) {
  REQUIRE_NCCL();
  auto& c = *ranks().nccl;
  const int r = c.rank(), n = c.size();
  const size_t count = (size_t(1) << 20) + 3;  // not a multiple of anything convenient
  std::vector<float> f(count);
  for (size_t i = 0; i < count; ++i) f[i] = float(r + 1) * float(i % 97);
  DeviceBuffer<float> df(f);
  c.allReduceSum(df.get(), count);
  const auto got = df.download();
  for (size_t i = 0; i < count; i += 4099) ASSERT_EQ(got[i], float(n * (n + 1) / 2) * float(i % 97)) << i;
  std::vector<double> d = {double(r), -double(r), 0.5 * r};
  DeviceBuffer<double> dd(d);
  c.allReduceMax(dd.get(), d.size());
  EXPECT_EQ(dd.download(), (std::vector<double>{double(n - 1), 0.0, 0.5 * (n - 1)}));
}

TEST(Nccl, AllGatherAndBroadcast) {
  REQUIRE_NCCL();
  auto& c = *ranks().nccl;
  const int r = c.rank(), n = c.size();
  std::vector<int> mine(5, r * 10);
  DeviceBuffer<int> send(mine), recv(size_t(5) * n);
  c.allGather(send.get(), 5 * sizeof(int), recv.get());
  const auto all = recv.download();
  for (int k = 0; k < n; ++k)
    for (int i = 0; i < 5; ++i) ASSERT_EQ(all[k * 5 + i], k * 10);
  std::vector<float> b(1000, float(r));
  DeviceBuffer<float> db(b);
  c.broadcast(db.get(), b.size() * sizeof(float), n - 1);
  EXPECT_EQ(db.download(), std::vector<float>(1000, float(n - 1)));
}

TEST(Nccl, DuplicateIsIndependentAndBarrierReturns) {
  REQUIRE_NCCL();
  auto& c = *ranks().nccl;
  auto d = c.duplicate();
  EXPECT_EQ(d->rank(), c.rank());
  EXPECT_EQ(d->size(), c.size());
  std::vector<double> x = {1.0};
  DeviceBuffer<double> dx(x);
  d->allReduceSum(dx.get(), 1);
  EXPECT_EQ(dx.download()[0], double(c.size()));
  c.barrier();
  d->barrier();
}

}  // namespace
}  // namespace kvtp
