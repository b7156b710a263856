// The gRPC control plane end to end, with real processes on 127.0.0.1: a coordinator, worker
// groups under `mpirun -np 2`, and clients (the kvtp binary and a gRPC stub).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

#include "launcher/grpc_common.h"
#include "process.h"
#include "test_util.h"

namespace kvtp {
namespace {

using namespace std::chrono_literals;
namespace v1 = ::kvtp::v1;
using launcher::callContext;

class ControlPlane : public ::testing::Test {
 protected:
  void SetUp() override {
    token_ = "token-" + std::to_string(::getpid());
    std::ofstream(dir_ / "token") << token_ << "\n";
    startCoordinator();
  }

  void startCoordinator(const std::string& extra = "") {
    const std::string listen = "127.0.0.1:" + std::to_string(port_);  // port 0 first, then the same again
    coordinator_ = std::make_unique<test::Process>(
        test::kvtpBinary() + " coordinator --listen " + listen + " --db " + (dir_ / "jobs.db") + " --token-file " +
            (dir_ / "token") + " --data-root " + std::filesystem::current_path().string() +
            " --worker-timeout-ms 2000 " + extra,
        dir_ / ("coordinator" + std::to_string(++coordinators_) + ".log"));
    ASSERT_TRUE(coordinator_->waitForLog("(port ", 10s)) << coordinator_->log();
    const std::string log = coordinator_->log();
    port_ = std::stoi(log.substr(log.find("(port ") + 6));
    stub_ = v1::Coordinator::NewStub(launcher::makeChannel(address(), ""));
  }

  test::Process& startWorkers(int np = 2, const std::string& extra = "") {
    workers_.push_back(std::make_unique<test::Process>(
        "env OMP_NUM_THREADS=1 mpirun --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS -np " +
            std::to_string(np) + " " + test::kvtpBinary() + " worker --coordinator " + address() + " --token-file " +
            (dir_ / "token") + " " + extra,
        dir_ / ("worker" + std::to_string(workers_.size()) + ".log")));
    EXPECT_TRUE(workers_.back()->waitForLog("registered as", 20s)) << workers_.back()->log();
    return *workers_.back();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  // The same `kvtp ppl` options through `kvtp submit ppl --wait --json` and run locally.
  std::pair<nlohmann::json, nlohmann::json> remoteAndLocal(const std::string& args) {
    const auto remote = test::run(test::kvtpBinary() + " submit ppl --coordinator " + address() + " --token-file " +
                                  (dir_ / "token") + " --wait --quiet --json " + args);
    EXPECT_EQ(remote.status, 0) << remote.err;
    const auto local = test::run(test::kvtpBinary() + " ppl --quiet --json " + args);
    EXPECT_EQ(local.status, 0) << local.err;
    return {nlohmann::json::parse(remote.out), nlohmann::json::parse(local.out)};
  }
  std::string client() const {
    return test::kvtpBinary() + " --coordinator " + address() + " --token-file " + (dir_ / "token") + " ";
  }

  v1::Job submit(const v1::PplRequest& req) {
    v1::SubmitJobRequest r;
    *r.mutable_ppl() = req;
    v1::Job j;
    const auto st = stub_->SubmitJob(callContext(token_, 10s).get(), r, &j);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return j;
  }

  v1::Job get(const std::string& id) {
    v1::GetJobRequest r;
    r.set_id(id);
    v1::Job j;
    const auto st = stub_->GetJob(callContext(token_, 10s).get(), r, &j);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return j;
  }

  template <class Pred>
  v1::Job waitUntil(const std::string& id, Pred&& pred, std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    v1::Job j = get(id);
    while (!pred(j) && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(100ms);
      j = get(id);
    }
    return j;
  }
  v1::Job waitFinal(const std::string& id, std::chrono::seconds limit = 120s) {
    return waitUntil(id, [](const v1::Job& j) { return launcher::isFinal(j.state()); }, limit);
  }

  static v1::PplRequest smallJob() {
    v1::PplRequest r;
    r.set_model("models/kvtp-opt-3m");
    r.set_data("data/c4/c4-heldout-200.json.gz");
    r.set_seq_len(128);
    r.set_max_windows(4);
    return r;
  }
  // Long enough (decode, token by token) to act on while it runs.
  static v1::PplRequest longJob() {
    v1::PplRequest r = smallJob();
    r.set_mode("decode");
    r.set_seq_len(256);
    r.set_max_windows(60);
    return r;
  }

  test::TempDir dir_;
  std::string token_;
  int port_ = 0, coordinators_ = 0;
  std::unique_ptr<test::Process> coordinator_;
  std::vector<std::unique_ptr<test::Process>> workers_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

TEST_F(ControlPlane, PplOverGrpcEqualsLocalPpl) {
  startWorkers(2);
  const auto [r, l] = remoteAndLocal("--model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --max-windows 6");
  EXPECT_EQ(r["tokens"], l["tokens"]);
  EXPECT_EQ(r["tp"], 2);
  // tp 2 on the worker vs one process: fp32 sums in another order.
  EXPECT_LE(std::abs(r["ppl"].get<double>() - l["ppl"].get<double>()) / l["ppl"].get<double>(), 1e-6);
  EXPECT_EQ(r["sequences"].size(), l["sequences"].size());
  // The result carries every rank's collective time: not measured on the CPU backend.
  EXPECT_EQ(r["collective_seconds_per_rank"], nlohmann::json::array({0.0, 0.0}));
  EXPECT_EQ(r["collective_share"], 0.0);
}

TEST_F(ControlPlane, KvCompressionOptionsTravelWithTheJob) {
  startWorkers(2);
  const auto [r, l] = remoteAndLocal(
      "--model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --seq-len 256 --max-windows 2 "
      "--kv h2o:budget=0.3 --kv-quant int8");
  EXPECT_EQ(r["mode"], "decode");
  EXPECT_EQ(r["kv"], l["kv"]);
  EXPECT_EQ(r["kv_bytes_full"], l["kv_bytes_full"]);  // tp 2 holds the same cache, split by heads
  EXPECT_LT(r["kv_ratio"].get<double>(), 0.5);
  EXPECT_LE(std::abs(r["ppl"].get<double>() - l["ppl"].get<double>()) / l["ppl"].get<double>(), 1e-4);
}

TEST_F(ControlPlane, OneLaunchWithTpOneServesAsTwoWorkersInParallel) {
  test::Process& launch = startWorkers(2, "--tp 1");
  EXPECT_TRUE(launch.waitForLog("registered as w2", 20s)) << launch.log();
  const std::string a = submit(longJob()).id(), b = submit(longJob()).id();
  // Both run at once, each on its own group.
  const auto both = [&] { return get(a).state() == v1::RUNNING && get(b).state() == v1::RUNNING; };
  const auto until = std::chrono::steady_clock::now() + 30s;
  while (!both() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(both());
  EXPECT_NE(get(a).worker(), get(b).worker());
  for (auto& id : {a, b}) {
    v1::CancelJobRequest r;
    r.set_id(id);
    v1::Job j;
    stub_->CancelJob(callContext(token_, 10s).get(), r, &j);
  }
  EXPECT_EQ(waitFinal(a, 30s).state(), v1::CANCELLED);
  EXPECT_EQ(waitFinal(b, 30s).state(), v1::CANCELLED);
  const v1::Job r = waitFinal(submit(smallJob()).id());
  EXPECT_EQ(r.state(), v1::SUCCEEDED);
  EXPECT_EQ(nlohmann::json::parse(r.result_json())["tp"], 1);
}

TEST_F(ControlPlane, CallsWithoutTheTokenAreRefused) {
  for (const std::string tok : {"", "wrong"}) {
    grpc::ClientContext ctx;
    if (!tok.empty()) ctx.AddMetadata("authorization", "Bearer " + tok);
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    v1::ListJobsRequest req;
    v1::ListJobsResponse resp;
    EXPECT_EQ(stub_->ListJobs(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  auto worker = v1::WorkerApi::NewStub(launcher::makeChannel(address(), ""));
  grpc::ClientContext ctx;
  v1::RegisterRequest req;
  req.set_tp(1);
  v1::RegisterResponse resp;
  EXPECT_EQ(worker->Register(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(ControlPlane, BadRequestsGetClearErrorsAndTheServerStaysUp) {
  struct Bad {
    v1::PplRequest req;
    grpc::StatusCode code;
    std::string says;
  };
  std::vector<Bad> cases;
  auto add = [&](auto edit, grpc::StatusCode code, const std::string& says) {
    v1::PplRequest r = smallJob();
    edit(r);
    cases.push_back({r, code, says});
  };
  add([](auto& r) { r.set_synthetic("opt-125m"); }, grpc::StatusCode::INVALID_ARGUMENT, "exactly one of model and synthetic");
  add([](auto& r) { r.set_data("/etc/passwd"); }, grpc::StatusCode::INVALID_ARGUMENT, "outside the data root");
  add([](auto& r) { r.set_model("../../../../etc"); }, grpc::StatusCode::INVALID_ARGUMENT, "outside the data root");
  add([](auto& r) { r.set_data("data/c4/missing.json.gz"); }, grpc::StatusCode::NOT_FOUND, "does not exist");
  add([](auto& r) { r.set_seq_len(1); }, grpc::StatusCode::INVALID_ARGUMENT, "seq_len");
  add([](auto& r) { r.set_mode("sideways"); }, grpc::StatusCode::INVALID_ARGUMENT, "mode");
  add([](auto& r) { r.set_kv("lru:budget=0.2"); }, grpc::StatusCode::INVALID_ARGUMENT, "KV method 'lru'");
  add([](auto& r) { r.set_kv("h2o:budget=0.2"); }, grpc::StatusCode::INVALID_ARGUMENT, "set mode to decode");
  add([](auto& r) { r.set_batch(8); }, grpc::StatusCode::INVALID_ARGUMENT, "set mode to decode and device to cuda");
  add([](auto& r) { r.set_join(std::string(2 << 20, 'x')); }, grpc::StatusCode::RESOURCE_EXHAUSTED, "");
  for (auto& c : cases) {
    v1::SubmitJobRequest r;
    *r.mutable_ppl() = c.req;
    v1::Job j;
    const auto st = stub_->SubmitJob(callContext(token_, 10s).get(), r, &j);
    EXPECT_EQ(st.error_code(), c.code) << st.error_message();
    EXPECT_NE(st.error_message().find(c.says), std::string::npos) << st.error_message();
  }
  v1::GetJobRequest g;
  g.set_id("job-999");
  v1::Job j;
  EXPECT_EQ(stub_->GetJob(callContext(token_, 10s).get(), g, &j).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(coordinator_->running());
  v1::ListJobsRequest lr;
  v1::ListJobsResponse resp;
  EXPECT_TRUE(stub_->ListJobs(callContext(token_, 10s).get(), lr, &resp).ok());
  EXPECT_EQ(resp.jobs_size(), 0);  // nothing bad was queued
}

TEST_F(ControlPlane, AJobThatFailsToLoadFailsAndTheWorkerTakesTheNext) {
  startWorkers(2);
  v1::PplRequest bad = smallJob();
  bad.set_model("tests/fixtures");  // a folder without config.json
  const v1::Job failed = waitFinal(submit(bad).id());
  EXPECT_EQ(failed.state(), v1::FAILED);
  EXPECT_NE(failed.error().find("config.json"), std::string::npos) << failed.error();
  const v1::Job ok = waitFinal(submit(smallJob()).id());
  EXPECT_EQ(ok.state(), v1::SUCCEEDED) << ok.error();
  EXPECT_TRUE(coordinator_->running());
  EXPECT_TRUE(workers_[0]->running());
}

TEST_F(ControlPlane, KilledWorkerRankRequeuesTheJobForANewGroup) {
  test::Process& group = startWorkers(2);
  const std::string id = submit(longJob()).id();
  const v1::Job running = waitUntil(id, [](const v1::Job& j) { return j.progress().windows_done() >= 1; }, 60s);
  ASSERT_EQ(running.state(), v1::RUNNING);
  // kill -9 one rank: mpirun then ends the whole group, whose heartbeats stop.
  const auto ranks = test::run("pgrep -P " + std::to_string(group.pid()));
  ASSERT_FALSE(ranks.out.empty());
  const std::string victim = ranks.out.substr(ranks.out.rfind('\n', ranks.out.size() - 2) + 1);
  ASSERT_EQ(test::run("kill -9 " + victim).status, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const v1::Job requeued = waitUntil(id, [](const v1::Job& j) { return j.state() != v1::RUNNING; }, 30s);
  EXPECT_EQ(requeued.state(), v1::QUEUED);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  EXPECT_NE(requeued.error().find("lost"), std::string::npos) << requeued.error();
  EXPECT_NE(group.wait(20s), -1) << "the group did not end after a rank was killed";

  startWorkers(2);  // a relaunched group registers and runs it
  const v1::Job done = waitFinal(id, 300s);
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << done.error();
  EXPECT_EQ(done.attempts(), 2);
  EXPECT_EQ(waitFinal(submit(smallJob()).id()).state(), v1::SUCCEEDED);
  EXPECT_TRUE(coordinator_->running());
}

TEST_F(ControlPlane, CancelStopsARunningJobOnAllRanks) {
  startWorkers(2);
  const std::string id = submit(longJob()).id();
  waitUntil(id, [](const v1::Job& j) { return j.progress().windows_done() >= 1; }, 60s);
  const auto r = test::run(test::kvtpBinary() + " cancel " + id + " --coordinator " + address() + " --token-file " +
                           (dir_ / "token"));
  EXPECT_EQ(r.status, 0) << r.err;
  const auto t0 = std::chrono::steady_clock::now();
  const v1::Job j = waitFinal(id, 30s);
  EXPECT_EQ(j.state(), v1::CANCELLED);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_EQ(waitFinal(submit(smallJob()).id()).state(), v1::SUCCEEDED);  // the group is free again
}

TEST_F(ControlPlane, RestartedCoordinatorLosesNothing) {
  startWorkers(2);
  const v1::Job finished = waitFinal(submit(smallJob()).id());
  ASSERT_EQ(finished.state(), v1::SUCCEEDED);
  workers_[0]->signalGroup(SIGTERM);
  EXPECT_NE(workers_[0]->wait(20s), -1) << workers_[0]->log();
  const std::string q1 = submit(smallJob()).id(), q2 = submit(smallJob()).id();

  coordinator_->signalGroup(SIGKILL);  // no chance to clean up
  coordinator_->wait(10s);
  startCoordinator();
  const v1::Job kept = get(finished.id());
  EXPECT_EQ(kept.state(), v1::SUCCEEDED);
  EXPECT_EQ(kept.result_json(), finished.result_json());
  EXPECT_EQ(get(q1).state(), v1::QUEUED);
  EXPECT_EQ(get(q2).state(), v1::QUEUED);
  startWorkers(2);
  EXPECT_EQ(waitFinal(q1).state(), v1::SUCCEEDED);
  EXPECT_EQ(waitFinal(q2).state(), v1::SUCCEEDED);
  const v1::Job fresh = submit(smallJob());
  EXPECT_NE(fresh.id(), q1);
  EXPECT_NE(fresh.id(), q2);
}

TEST_F(ControlPlane, SigtermShutsTheCoordinatorDownCleanly) {
  coordinator_->signalGroup(SIGTERM);
  EXPECT_EQ(coordinator_->wait(10s), 0) << coordinator_->log();
  EXPECT_NE(coordinator_->log().find("coordinator: stopped"), std::string::npos);
}

TEST_F(ControlPlane, TlsWithASelfSignedPair) {
  const auto gen = test::run("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext "
                             "subjectAltName=IP:127.0.0.1,DNS:localhost -keyout " + (dir_ / "key.pem") + " -out " +
                             (dir_ / "cert.pem"));
  ASSERT_EQ(gen.status, 0) << gen.err;
  coordinator_->signalGroup(SIGTERM);
  coordinator_->wait(10s);
  startCoordinator("--tls-cert " + (dir_ / "cert.pem") + " --tls-key " + (dir_ / "key.pem"));
  const std::string base = test::kvtpBinary() + " jobs --coordinator " + address() + " --token-file " + (dir_ / "token");
  const auto tls = test::run(base + " --tls-ca " + (dir_ / "cert.pem"));
  EXPECT_EQ(tls.status, 0) << tls.err;
  const auto plain = test::run(base + " --timeout 3");
  EXPECT_NE(plain.status, 0);  // a plaintext client cannot talk to a TLS server
}

// 200 concurrent calls (a third each Submit, GetJob, ListJobs) from 8 threads; no error and no
// job lost. Latency percentiles are printed for docs/BENCHMARKS.md, not asserted.
TEST_F(ControlPlane, TwoHundredConcurrentCallsLoseNoJob) {
  std::atomic<int> errors{0};
  std::mutex mu;
  std::vector<double> ms;
  std::vector<std::string> ids;
  auto one = [&](int i) {
    const auto t0 = std::chrono::steady_clock::now();
    grpc::Status st;
    if (i % 3 == 0) {
      v1::SubmitJobRequest r;
      *r.mutable_ppl() = smallJob();
      v1::Job j;
      st = stub_->SubmitJob(callContext(token_, 30s).get(), r, &j);
      if (st.ok()) {
        std::lock_guard<std::mutex> lk(mu);
        ids.push_back(j.id());
      }
    } else if (i % 3 == 1) {
      v1::GetJobRequest r;
      r.set_id("job-1");
      v1::Job j;
      st = stub_->GetJob(callContext(token_, 30s).get(), r, &j);
      if (st.error_code() == grpc::StatusCode::NOT_FOUND) st = grpc::Status::OK;  // raced the first submit
    } else {
      v1::ListJobsRequest r;
      v1::ListJobsResponse resp;
      st = stub_->ListJobs(callContext(token_, 30s).get(), r, &resp);
    }
    const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) errors++;
    std::lock_guard<std::mutex> lk(mu);
    ms.push_back(t);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = t; i < 200; i += 8) one(i);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  ASSERT_EQ(ms.size(), 200u);
  std::sort(ms.begin(), ms.end());
  std::printf("load: 200 calls, 8 threads: p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms\n", ms[100], ms[180],
              ms[198], ms[199]);
  v1::ListJobsRequest lr;
  lr.set_limit(1000);
  v1::ListJobsResponse resp;
  ASSERT_TRUE(stub_->ListJobs(callContext(token_, 10s).get(), lr, &resp).ok());
  EXPECT_EQ(resp.jobs_size(), int(ids.size()));
  for (auto& id : ids) EXPECT_EQ(get(id).state(), v1::QUEUED);
}

}  // namespace
}  // namespace kvtp
