// kvtp across hosts, emulated on one machine (scripts/netns-cluster.sh): four network namespaces
// on a bridge, each its own host with its own address, Open MPI starting ranks in them through an
// rsh agent as it would over ssh, TCP between them. Needs root; where namespaces cannot be made,
// every test says it skipped. The namespaces and the bridge are removed at the end, also on
// failure.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "launcher/grpc_common.h"
#include "process.h"
#include "test_util.h"

namespace kvtp {
namespace {

using namespace std::chrono_literals;
namespace v1 = ::kvtp::v1;

class Hosts : public ::testing::Test {
 public:
  static void SetUpTestSuite() {
    name_ = "kt" + std::to_string(::getpid() % 100000);
    const auto up = test::run("bash scripts/netns-cluster.sh up 4 " + name_);
    if (up.status != 0) {
      skip_ = "cannot make network namespaces here (root and iproute2 needed): " + up.err.substr(0, 200);
      return;
    }
    dir_ = up.out.substr(0, up.out.find('\n'));
  }
  static void TearDownTestSuite() {
    if (skip_.empty()) test::run("bash scripts/netns-cluster.sh down " + name_);
  }

 protected:
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    tokens_ = std::make_unique<test::TempDir>();
    std::ofstream(*tokens_ / "client-tokens") << "tester client-token-0123456789 submit\n";
    std::ofstream(*tokens_ / "client-token") << "client-token-0123456789\n";
    std::ofstream(*tokens_ / "worker-token") << "worker-token-0123456789\n";
  }
  void TearDown() override {
    processes_.clear();  // killed with their process groups
    // Anything left in the namespaces (ranks under an agent) goes too.
    for (int h = 1; h <= 4; ++h) test::run("ip netns pids " + host(h) + " | xargs -r kill -9");
    for (int h = 1; h <= 4; ++h) test::run("bash scripts/netns-cluster.sh link " + host(h) + " up");
  }

  static std::string host(int i) { return name_ + "-h" + std::to_string(i); }
  static std::string addr(int i) {
    std::ifstream in(dir_ + "/" + host(i) + ".addr");
    std::string a;
    in >> a;
    return a;
  }
  // mpirun over the emulated hosts: `hosts` as Open MPI's --host list (e.g. "H1:2,H2:2").
  static std::string mpirun(const std::string& hosts, int np) {
    std::ifstream in(dir_ + "/mpirun-args");
    std::string args((std::istreambuf_iterator<char>(in)), {});
    args.erase(args.find_last_not_of(" \n") + 1);
    return "env PMIX_MCA_gds=hash OMP_NUM_THREADS=1 timeout 300 mpirun " + args +
           " -x OMP_NUM_THREADS --oversubscribe --host " + hosts + " -np " + std::to_string(np) + " ";
  }
  static std::string in(int h) { return "ip netns exec " + host(h) + " "; }

  test::Process& start(const std::string& cmd, const std::string& log) {
    processes_.push_back(std::make_unique<test::Process>(cmd, *tokens_ / log));
    return *processes_.back();
  }
  // The coordinator on host h; returns its address.
  std::string startCoordinator(int h, const std::string& extra = "") {
    test::Process& c = start(in(h) + test::kvtpBinary() + " coordinator --listen " + addr(h) + ":0 --db " +
                                 (*tokens_ / "jobs.db") + " --client-tokens " + (*tokens_ / "client-tokens") +
                                 " --worker-token-file " + (*tokens_ / "worker-token") + " --data-root " +
                                 std::filesystem::current_path().string() + " --worker-timeout-ms 2000 " + extra,
                             "coordinator" + std::to_string(processes_.size()) + ".log");
    EXPECT_TRUE(c.waitForLog("(port ", 10s)) << c.log();
    const std::string log = c.log();
    return addr(h) + ":" + std::to_string(std::stoi(log.substr(log.find("(port ") + 6)));
  }
  test::Process& startWorkers(const std::string& hosts, int np, const std::string& coordinator,
                              const std::string& extra = "") {
    test::Process& w = start(mpirun(hosts, np) + test::kvtpBinary() + " worker --coordinator " + coordinator +
                                 " --token-file " + (*tokens_ / "worker-token") + " " + extra,
                             "workers" + std::to_string(processes_.size()) + ".log");
    const bool registered = w.waitForLog("registered as", 30s);
    EXPECT_TRUE(registered) << w.log();
    if (!registered) throw std::runtime_error("the worker group did not register");
    return w;
  }

  v1::Job get(const std::string& coordinator, const std::string& id) {
    auto stub = v1::Coordinator::NewStub(launcher::makeChannel(coordinator, ""));
    v1::GetJobRequest r;
    r.set_id(id);
    v1::Job j;
    stub->GetJob(launcher::callContext("client-token-0123456789", 10s).get(), r, &j);
    return j;
  }
  template <class Pred>
  v1::Job waitUntil(const std::string& coordinator, const std::string& id, Pred&& pred, std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    v1::Job j = get(coordinator, id);
    while (!pred(j) && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(100ms);
      j = get(coordinator, id);
    }
    return j;
  }
  std::string submit(const std::string& coordinator, const std::string& args, int from_host = 4) {
    const auto r = test::run(in(from_host) + "timeout 60 " + test::kvtpBinary() + " submit ppl --coordinator " + coordinator +
                             " --token-file " + (*tokens_ / "client-token") + " " + args);
    EXPECT_EQ(r.status, 0) << r.err;
    return r.out.substr(0, r.out.find('\n'));
  }

  static inline std::string name_, dir_, skip_;
  std::unique_ptr<test::TempDir> tokens_;
  std::vector<std::unique_ptr<test::Process>> processes_;
};

std::vector<std::vector<double>> readLogprobs(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::vector<double>> out;
  for (std::string line; std::getline(in, line);)
    out.push_back(nlohmann::json::parse(line)["logprobs"].get<std::vector<double>>());
  return out;
}

double maxDiff(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t s = 0; s < std::min(a.size(), b.size()); ++s) {
    EXPECT_EQ(a[s].size(), b[s].size());
    for (size_t i = 0; i < std::min(a[s].size(), b[s].size()); ++i) worst = std::max(worst, std::abs(a[s][i] - b[s][i]));
  }
  return worst;
}

// Tensor parallel within a host and across hosts, and tp 2 x dp 2 over two hosts, with H2O under
// one budget: the single process's log-probs (the decisions are the same at any tp; int8 would
// add code flips where tp 2's projections differ in the last bits, ~2e-3).
TEST_F(Hosts, PplWithinAndAcrossHostsMatchesOneProcess) {
  const std::string args =
      " ppl --model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --seq-len 128 --max-windows 4 "
      "--mode decode --kv h2o:budget=0.3,sinks=2,recent=8 --quiet --json --logprobs ";
  const auto one = test::run(test::kvtpBinary() + args + (*tokens_ / "one.jsonl"));
  ASSERT_EQ(one.status, 0) << one.err;
  const auto ref = readLogprobs(*tokens_ / "one.jsonl");
  ASSERT_EQ(ref.size(), 4u);
  struct Layout {
    std::string hosts;
    int np;
    std::string tp;
  };
  for (const Layout& l : {Layout{host(1) + ":2", 2, "2"}, Layout{host(1) + ":1," + host(2) + ":1", 2, "2"},
                          Layout{host(1) + ":2," + host(2) + ":2", 4, "2"}}) {
    const std::string out = *tokens_ / "lp.jsonl";
    const auto r = test::run(mpirun(l.hosts, l.np) + test::kvtpBinary() + args + out + " --tp " + l.tp);
    ASSERT_EQ(r.status, 0) << l.hosts << "\n" << r.err;
    EXPECT_LE(maxDiff(readLogprobs(out), ref), 1e-4) << l.hosts;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["tp"], 2);
    EXPECT_EQ(j["dp"], l.np / 2);
  }
}

// The coordinator on one host (TLS), a worker group spanning two others, the client on a fourth.
TEST_F(Hosts, ControlPlaneAcrossHostsGivesTheLocalResult) {
  const std::string cert = *tokens_ / "cert.pem", key = *tokens_ / "key.pem";
  const auto gen = test::run("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=kvtp -addext "
                             "subjectAltName=IP:" + addr(1) + " -keyout " + key + " -out " + cert);
  ASSERT_EQ(gen.status, 0) << gen.err;
  const std::string coordinator = startCoordinator(1, "--tls-cert " + cert + " --tls-key " + key);
  startWorkers(host(2) + ":1," + host(3) + ":1", 2, coordinator, "--tls-ca " + cert);
  const std::string job = "--model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --max-windows 3";
  const auto remote = test::run(in(4) + "timeout 120 " + test::kvtpBinary() + " submit ppl --coordinator " + coordinator +
                                " --token-file " + (*tokens_ / "client-token") + " --tls-ca " + cert +
                                " --wait --quiet --json " + job);
  ASSERT_EQ(remote.status, 0) << remote.err;
  const auto local = test::run(test::kvtpBinary() + " ppl --quiet --json " + job);
  ASSERT_EQ(local.status, 0) << local.err;
  const auto r = nlohmann::json::parse(remote.out), l = nlohmann::json::parse(local.out);
  EXPECT_EQ(r["tokens"], l["tokens"]);
  EXPECT_EQ(r["tp"], 2);
  EXPECT_LE(std::abs(r["ppl"].get<double>() - l["ppl"].get<double>()) / l["ppl"].get<double>(), 1e-6);
}

// A host of a running group dies: the coordinator notices within its heartbeat timeout, re-queues
// the job, and a group on a surviving host finishes it. Then the coordinator's host dies too and
// comes back: the finished job is still there (SQLite).
TEST_F(Hosts, AHostLostMidJobIsRequeuedAndNothingIsLost) {
  const std::string coordinator = startCoordinator(1);
  test::Process& spanning = startWorkers(host(2) + ":1," + host(3) + ":1", 2, coordinator);
  const std::string id = submit(coordinator, "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz "
                                             "--mode decode --seq-len 256 --max-windows 40");
  ASSERT_EQ(id.rfind("job-", 0), 0u) << id;
  const v1::Job running = waitUntil(coordinator, id, [](const v1::Job& j) { return j.progress().windows_done() >= 1; }, 60s);
  ASSERT_EQ(running.state(), v1::RUNNING) << running.error();
  startWorkers(host(4) + ":1", 1, coordinator);  // idle: the queue is empty
  ASSERT_EQ(test::run("ip netns pids " + host(3) + " | xargs -r kill -9").status, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const v1::Job requeued = waitUntil(coordinator, id, [&](const v1::Job& j) { return j.attempts() >= 2; }, 30s);
  EXPECT_GE(requeued.attempts(), 2) << requeued.error();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s);
  EXPECT_NE(spanning.wait(30s), -1) << "the group spanning the lost host did not end";
  const v1::Job done = waitUntil(coordinator, id, [](const v1::Job& j) { return launcher::isFinal(j.state()); }, 240s);
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_NE(done.worker().find("@"), std::string::npos);
  // The coordinator's host dies and comes back with the same database.
  test::run("ip netns pids " + host(1) + " | xargs -r kill -9");
  const std::string again = startCoordinator(1);
  const v1::Job kept = get(again, id);
  EXPECT_EQ(kept.state(), v1::SUCCEEDED);
  EXPECT_EQ(kept.result_json(), done.result_json());
}

// A worker host cut off from the coordinator (its link down past the heartbeat timeout) while it
// runs a job: the coordinator re-queues the job rather than leave it RUNNING; when the link comes
// back the worker learns the job is no longer its, registers again, and finishes the queue.
TEST_F(Hosts, APartitionedWorkerRegistersAgainAndNoJobStaysRunning) {
  const std::string coordinator = startCoordinator(1);
  test::Process& worker = startWorkers(host(2) + ":1", 1, coordinator);
  const std::string id = submit(coordinator, "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz "
                                             "--mode decode --seq-len 256 --max-windows 40");
  waitUntil(coordinator, id, [](const v1::Job& j) { return j.progress().windows_done() >= 1; }, 60s);
  ASSERT_EQ(test::run("bash scripts/netns-cluster.sh link " + host(2) + " down").status, 0);
  const v1::Job cut = waitUntil(coordinator, id, [](const v1::Job& j) { return j.state() != v1::RUNNING; }, 20s);
  EXPECT_EQ(cut.state(), v1::QUEUED) << cut.error();
  EXPECT_NE(cut.error().find("lost"), std::string::npos) << cut.error();
  ASSERT_EQ(test::run("bash scripts/netns-cluster.sh link " + host(2) + " up").status, 0);
  const v1::Job done = waitUntil(coordinator, id, [](const v1::Job& j) { return launcher::isFinal(j.state()); }, 240s);
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_GE(done.attempts(), 2);
  const std::string log = worker.log();
  EXPECT_NE(log.find("registered as", log.find("registered as") + 1), std::string::npos) << log;
}

// Slurm, as users launch on clusters: slurmctld on one emulated host, slurmd on two, and
// scripts/kvtp.sbatch starting a worker group over both nodes (srun --mpi=pmix); a job submitted
// over gRPC from a fourth host runs on it at tp 2 and gives the local result.
TEST_F(Hosts, SbatchStartsAWorkerGroupThatServesAJob) {
  if (test::run("which slurmctld slurmd sbatch").status != 0) GTEST_SKIP() << "Slurm is not installed";
  const std::string coordinator = startCoordinator(1);
  const auto slurm = test::run("bash scripts/netns-cluster.sh slurm " + name_ + " " + host(1) + " " + host(2) + " " + host(3));
  ASSERT_EQ(slurm.status, 0) << slurm.err;
  const std::string conf = "SLURM_CONF=" + slurm.out.substr(0, slurm.out.find('\n')) + " ";
  const auto batch = test::run(conf + "bash scripts/netns-cluster.sh exec " + host(4) + " sbatch --nodes=2 --output=" +
                               (*tokens_ / "slurm-%j.out") + " scripts/kvtp.sbatch " + coordinator + " " +
                               (*tokens_ / "worker-token"));
  ASSERT_EQ(batch.status, 0) << batch.err;
  EXPECT_NE(batch.out.find("Submitted batch job"), std::string::npos) << batch.out;
  const std::string job = "--model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --max-windows 3";
  const std::string id = submit(coordinator, job);
  const v1::Job done = waitUntil(coordinator, id, [](const v1::Job& j) { return launcher::isFinal(j.state()); }, 120s);
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error() << test::run("cat " + (*tokens_ / "slurm-*.out")).out;
  const auto r = nlohmann::json::parse(done.result_json());
  EXPECT_EQ(r["tp"], 2);
  EXPECT_NE(done.worker().find("@" + host(2)), std::string::npos) << done.worker();  // rank 0 on the first node
  const auto local = test::run(test::kvtpBinary() + " ppl --quiet --json " + job);
  ASSERT_EQ(local.status, 0) << local.err;
  const auto l = nlohmann::json::parse(local.out);
  EXPECT_EQ(r["tokens"], l["tokens"]);
  EXPECT_LE(std::abs(r["ppl"].get<double>() - l["ppl"].get<double>()) / l["ppl"].get<double>(), 1e-6);
  test::run(conf + "bash scripts/netns-cluster.sh exec " + host(4) + " scancel --user=root");
}

}  // namespace
}  // namespace kvtp
