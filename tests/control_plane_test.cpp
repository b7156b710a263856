// The gRPC control plane end to end, with real processes on 127.0.0.1: a coordinator, worker
// groups under `mpirun -np 2`, and clients (the kvtp binary and a gRPC stub).
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <regex>
#include <set>
#include <thread>

#include "launcher/grpc_common.h"
#include "launcher/sweep.h"
#include "process.h"
#include "test_util.h"

namespace kvtp {
namespace {

using namespace std::chrono_literals;
namespace v1 = ::kvtp::v1;
using launcher::callContext;

class ControlPlane : public ::testing::Test {
 protected:
  // Four clients (alice and bob submit, reader reads, root administers) and the workers' token;
  // the client commands use alice's (dir_/token).
  void SetUp() override {
    const std::string pid = std::to_string(::getpid()) + "-0123456789";  // tokens of 16 characters at least
    token_ = "alice-token-" + pid, bob_ = "bob-token-000-" + pid, reader_ = "reader-token-0-" + pid,
    admin_ = "root-token-000-" + pid, worker_token_ = "worker-token-0-" + pid;
    std::ofstream(dir_ / "token") << token_ << "\n";
    std::ofstream(dir_ / "worker-token") << worker_token_ << "\n";
    std::ofstream(dir_ / "client-tokens") << "# name token role\nalice " << token_ << "\nbob " << bob_ << " submit\nreader "
                                          << reader_ << " read\nroot " << admin_ << " admin\n";
    startCoordinator();
  }

  void startCoordinator(const std::string& extra = "") {
    const std::string listen = "127.0.0.1:" + std::to_string(port_);  // port 0 first, then the same again
    coordinator_ = std::make_unique<test::Process>(
        test::kvtpBinary() + " coordinator --listen " + listen + " --db " + (dir_ / "jobs.db") + " --client-tokens " +
            (dir_ / "client-tokens") + " --worker-token-file " + (dir_ / "worker-token") + " --data-root " +
            std::filesystem::current_path().string() +
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
            (dir_ / "worker-token") + " " + extra,
        dir_ / ("worker" + std::to_string(workers_.size()) + ".log")));
    EXPECT_TRUE(workers_.back()->waitForLog("registered as", 20s)) << workers_.back()->log();
    return *workers_.back();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  // The id of the job a worker stub fetches as `worker_id` (the worker credential); "" if none.
  std::string fetchAs(v1::WorkerApi::Stub& worker, const std::string& worker_id) {
    v1::FetchJobRequest fetch;
    fetch.set_worker_id(worker_id);
    fetch.set_wait_ms(5000);
    v1::FetchJobResponse got;
    const auto st = worker.FetchJob(callContext(worker_token_, 10s).get(), fetch, &got);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return got.job().id();
  }

  // A worker group of `tp` registered through the worker credential as `host`: its worker id.
  std::string registerAs(v1::WorkerApi::Stub& worker, const std::string& host, int tp = 1) {
    v1::RegisterRequest reg;
    reg.set_tp(tp);
    reg.set_host(host);
    v1::RegisterResponse me;
    const auto st = worker.Register(callContext(worker_token_, 10s).get(), reg, &me);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return me.worker_id();
  }
  // Reports job `id` SUCCEEDED with `result` as worker `worker_id`.
  void reportSuccess(v1::WorkerApi::Stub& worker, const std::string& worker_id, const std::string& id,
                     const std::string& result) {
    v1::ResultReport report;
    report.set_worker_id(worker_id);
    report.set_job_id(id);
    report.set_state(v1::SUCCEEDED);
    report.set_result_json(result);
    v1::ResultAck ack;
    const auto st = worker.ReportResult(callContext(worker_token_, 10s).get(), report, &ack);
    EXPECT_TRUE(st.ok()) << st.error_message();
  }

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
  std::string token_, bob_, reader_, admin_, worker_token_;
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

// Each WorkerApi method with a client credential (even an admin's) is refused, and the Coordinator
// service with the workers' token; a read-only client reads but cannot submit or cancel.
TEST_F(ControlPlane, EachRoleCallsOnlyWhatItMay) {
  auto worker = v1::WorkerApi::NewStub(launcher::makeChannel(address(), ""));
  for (const std::string& tok : {token_, admin_, reader_}) {
    v1::RegisterRequest reg;
    reg.set_tp(1);
    v1::RegisterResponse rr;
    EXPECT_EQ(worker->Register(callContext(tok, 10s).get(), reg, &rr).error_code(), grpc::StatusCode::PERMISSION_DENIED);
    v1::HeartbeatResponse hr;
    EXPECT_EQ(worker->Heartbeat(callContext(tok, 10s).get(), {}, &hr).error_code(), grpc::StatusCode::PERMISSION_DENIED);
    v1::FetchJobResponse fr;
    EXPECT_EQ(worker->FetchJob(callContext(tok, 10s).get(), {}, &fr).error_code(), grpc::StatusCode::PERMISSION_DENIED);
    v1::ProgressAck pa;
    EXPECT_EQ(worker->ReportProgress(callContext(tok, 10s).get(), {}, &pa).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
    v1::ResultReport result;
    result.set_state(v1::SUCCEEDED);
    v1::ResultAck ra;
    const auto st = worker->ReportResult(callContext(tok, 10s).get(), result, &ra);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_NE(st.error_message().find("client credential"), std::string::npos) << st.error_message();
  }
  v1::SubmitJobRequest submit;
  *submit.mutable_ppl() = smallJob();
  v1::Job j;
  EXPECT_EQ(stub_->SubmitJob(callContext(worker_token_, 10s).get(), submit, &j).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(stub_->SubmitJob(callContext(reader_, 10s).get(), submit, &j).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::ListJobsResponse list;
  EXPECT_EQ(stub_->ListJobs(callContext(worker_token_, 10s).get(), {}, &list).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  const v1::Job mine = this->submit(smallJob());
  EXPECT_EQ(mine.owner(), "alice");
  EXPECT_TRUE(stub_->ListJobs(callContext(reader_, 10s).get(), {}, &list).ok());
  EXPECT_EQ(list.jobs_size(), 1);
  v1::CancelJobRequest cancel;
  cancel.set_id(mine.id());
  EXPECT_EQ(stub_->CancelJob(callContext(reader_, 10s).get(), cancel, &j).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(coordinator_->running());
}

TEST_F(ControlPlane, AClientCancelsOnlyItsOwnJobsUnlessAdmin) {
  const v1::Job a = submit(smallJob()), b = submit(smallJob());
  v1::CancelJobRequest req;
  req.set_id(a.id());
  v1::Job j;
  const auto bob = stub_->CancelJob(callContext(bob_, 10s).get(), req, &j);
  EXPECT_EQ(bob.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(bob.error_message().find("submitted by 'alice'"), std::string::npos) << bob.error_message();
  EXPECT_EQ(get(a.id()).state(), v1::QUEUED);
  ASSERT_TRUE(stub_->CancelJob(callContext(token_, 10s).get(), req, &j).ok());  // its owner
  EXPECT_EQ(j.state(), v1::CANCELLED);
  req.set_id(b.id());
  ASSERT_TRUE(stub_->CancelJob(callContext(admin_, 10s).get(), req, &j).ok());  // an admin
  EXPECT_EQ(j.state(), v1::CANCELLED);
}

// A worker (the real credential) that reports forged results: each fails its job with the reason,
// and the coordinator takes the next. The plan is what the worker said in its progress.
TEST_F(ControlPlane, ForgedResultsFailTheJob) {
  auto worker = v1::WorkerApi::NewStub(launcher::makeChannel(address(), ""));
  const std::string me = registerAs(*worker, "forger");
  EXPECT_TRUE(std::regex_match(me, std::regex("w[0-9]+-[0-9a-f]{32}@forger"))) << me;
  const std::string model = std::filesystem::canonical("models/kvtp-opt-3m").string(),
                    data = std::filesystem::canonical("data/c4/c4-heldout-200.json.gz").string();
  const auto good = [&] {
    return nlohmann::json{{"ppl", std::exp(600.0 / 200)}, {"nll", 600.0}, {"tokens", 200}, {"windows", 2}, {"tp", 1},
                          {"sequences", {{{"ppl", 20.0}, {"tokens", 100}}, {{"ppl", 20.1}, {"tokens", 100}}}},
                          {"model", model}, {"data", data}, {"mode", "prefill"}, {"device", "cpu"}, {"kv", "full"}};
  };
  std::vector<std::pair<std::string, std::string>> forged = {  // result, what the error says
      {"ppl 1.0", "not JSON"},
      {R"([1, 2])", "not a JSON object"},
      {[&] { auto r = good(); r["ppl"] = 1.0; return r.dump(); }(), "is not exp(nll / tokens)"},
      {R"({"ppl": NaN, "tokens": 200})", "not JSON"},  // NaN is no JSON number
      {[&] { auto r = good(); r["ppl"] = -20.0; return r.dump(); }(), "is not finite and positive"},
      {[&] { auto r = good(); r["nll"] = "600"; return r.dump(); }(), "wrong type"},
      {[&] { auto r = good(); r["model"] = "/data/other-model"; return r.dump(); }(), "model \"/data/other-model\""},
      {[&] { auto r = good(); r["tokens"] = 5; r["nll"] = 15.0; r["ppl"] = std::exp(3.0); return r.dump(); }(),
       "do not add up"},
      {[&] {
         auto r = good();
         r["tokens"] = 150, r["nll"] = 450.0, r["sequences"][1]["tokens"] = 50;
         return r.dump();
       }(), "but the worker planned 200 in 2"},
      {good().dump(), ""}};
  for (auto& [result, says] : forged) {
    const std::string id = submit(smallJob()).id();
    ASSERT_EQ(fetchAs(*worker, me), id);
    v1::ProgressReport progress;
    progress.set_worker_id(me);
    progress.set_job_id(id);
    progress.mutable_progress()->set_windows_total(2);
    progress.mutable_progress()->set_tokens_total(200);
    v1::ProgressAck ack;
    ASSERT_TRUE(worker->ReportProgress(callContext(worker_token_, 10s).get(), progress, &ack).ok());
    reportSuccess(*worker, me, id, result);
    const v1::Job j = get(id);
    if (&result == &forged.back().first) {  // the last one is consistent: stored
      EXPECT_EQ(j.state(), v1::SUCCEEDED) << j.error();
      EXPECT_DOUBLE_EQ(j.ppl(), std::exp(3.0));
      continue;
    }
    EXPECT_EQ(j.state(), v1::FAILED) << result;
    EXPECT_NE(j.error().find("result was rejected"), std::string::npos) << j.error();
    EXPECT_NE(j.error().find(says), std::string::npos) << j.error();
    EXPECT_TRUE(j.result_json().empty());
  }
  EXPECT_TRUE(coordinator_->running());
}

// A jobs.db written before jobs had owners (the same table, each Job serialized without field 12)
// stays readable: its jobs are served as they were, and with no owner only an admin cancels them.
TEST_F(ControlPlane, AJobsDbFromBeforeOwnersStaysReadable) {
  coordinator_->signalGroup(SIGKILL);
  coordinator_->wait(10s);
  for (const char* f : {"jobs.db", "jobs.db-wal", "jobs.db-shm"}) std::filesystem::remove(dir_ / f);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ / "jobs.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, job BLOB NOT NULL)",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  v1::Job done, queued;
  done.set_id("job-1"), done.set_state(v1::SUCCEEDED), done.set_ppl(12.5), done.set_result_json(R"({"ppl": 12.5})");
  queued.set_id("job-2"), queued.set_state(v1::QUEUED);
  for (v1::Job* j : {&done, &queued}) {
    *j->mutable_request() = smallJob();
    j->set_created_unix_ms(1700000000000), j->set_updated_unix_ms(1700000000000);
    const std::string blob = j->SerializeAsString();
    sqlite3_stmt* st = nullptr;
    sqlite3_prepare_v2(db, "INSERT INTO jobs (seq, id, job) VALUES (?, ?, ?)", -1, &st, nullptr);
    sqlite3_bind_int64(st, 1, std::stoll(j->id().substr(4)));
    sqlite3_bind_text(st, 2, j->id().c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_blob(st, 3, blob.data(), int(blob.size()), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  startCoordinator();
  const v1::Job kept = get("job-1");
  EXPECT_EQ(kept.state(), v1::SUCCEEDED);
  EXPECT_EQ(kept.ppl(), 12.5);
  EXPECT_EQ(kept.owner(), "");
  EXPECT_EQ(get("job-2").state(), v1::QUEUED);
  v1::CancelJobRequest req;
  req.set_id("job-2");
  v1::Job j;
  EXPECT_EQ(stub_->CancelJob(callContext(token_, 10s).get(), req, &j).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_TRUE(stub_->CancelJob(callContext(admin_, 10s).get(), req, &j).ok());
  EXPECT_EQ(j.state(), v1::CANCELLED);
  const v1::Job fresh = submit(smallJob());
  EXPECT_EQ(fresh.id(), "job-3");
  EXPECT_EQ(fresh.owner(), "alice");
}

// A worker that heartbeats as idle while a job is RUNNING on it (it stopped the job while cut
// off and was handed it back as it registered again): the job goes back to the queue after a few
// heartbeats instead of staying RUNNING forever.
TEST_F(ControlPlane, AJobItsWorkerNoLongerRunsIsRequeued) {
  auto worker = v1::WorkerApi::NewStub(launcher::makeChannel(address(), ""));
  const std::string me = registerAs(*worker, "idler");
  const std::string id = submit(smallJob()).id();
  ASSERT_EQ(fetchAs(*worker, me), id);
  const auto beat = [&](const std::string& job) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(me);
    hb.set_current_job(job);
    v1::HeartbeatResponse r;
    return worker->Heartbeat(callContext(worker_token_, 10s).get(), hb, &r).ok();
  };
  ASSERT_TRUE(beat(""));  // right after the fetch: not yet taken for orphaned
  EXPECT_EQ(get(id).state(), v1::RUNNING);
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(beat(id)), std::this_thread::sleep_for(700ms);
  EXPECT_EQ(get(id).state(), v1::RUNNING) << "a worker that says it runs the job keeps it";
  const v1::Job j = waitUntil(id, [&](const v1::Job& j) { return beat("") && j.state() != v1::RUNNING; }, 20s);
  EXPECT_EQ(j.state(), v1::QUEUED);
  EXPECT_NE(j.error().find("no longer runs the job"), std::string::npos) << j.error();
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

// A generation job over gRPC: the same ids and text as `kvtp generate` here (tp 2 on the worker),
// the text arriving in its progress as it is generated, cancel stopping it within a step, and a
// result that is not this job's generation rejected.
TEST_F(ControlPlane, GenerationOverGrpcEqualsLocalAndStreamsItsText) {
  startWorkers(2);
  const std::string args = "--model models/kvtp-llama-2m --prompt 'The city council' --prompt 'Rain fell' "
                           "--max-new-tokens 24 --temperature 0.7 --seed 4 --kv h2o:budget=0.5";
  const auto remote = test::run(test::kvtpBinary() + " submit generate --coordinator " + address() + " --token-file " +
                                (dir_ / "token") + " --wait --quiet --json " + args);
  ASSERT_EQ(remote.status, 0) << remote.err;
  const auto local = test::run(test::kvtpBinary() + " generate --json " + args + " | tail -1");
  ASSERT_EQ(local.status, 0) << local.err;
  const auto r = nlohmann::json::parse(remote.out), l = nlohmann::json::parse(local.out);
  EXPECT_EQ(r["tp"], 2);
  ASSERT_EQ(r["sequences"].size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(r["sequences"][i]["ids"], l["sequences"][i]["ids"]) << i;
    EXPECT_EQ(r["sequences"][i]["text"], l["sequences"][i]["text"]) << i;
  }

  // Progress carries the text so far; a long generation is cancelled within a step.
  v1::SubmitJobRequest req;
  v1::GenerateRequest& g = *req.mutable_generate();
  g.set_model("models/kvtp-llama-2m");
  for (int i = 0; i < 200; ++i) g.add_prompts("Once upon a time " + std::to_string(i));  // minutes of work
  g.set_max_new_tokens(900);
  g.set_ignore_eos(true);
  g.set_kv("h2o:budget=0.3");
  v1::Job job;
  ASSERT_TRUE(stub_->SubmitJob(callContext(token_, 10s).get(), req, &job).ok());
  const v1::Job seen = waitUntil(job.id(), [](const v1::Job& j) { return j.progress().tokens_done() >= 20; }, 60s);
  ASSERT_EQ(seen.state(), v1::RUNNING);
  ASSERT_GE(seen.progress().texts_size(), 1);
  EXPECT_FALSE(seen.progress().texts(0).empty());
  v1::CancelJobRequest cancel;
  cancel.set_id(job.id());
  v1::Job cancelled;
  ASSERT_TRUE(stub_->CancelJob(callContext(token_, 10s).get(), cancel, &cancelled).ok());
  EXPECT_EQ(waitFinal(job.id(), 30s).state(), v1::CANCELLED);

  // A request with both kinds, or none, is refused.
  *req.mutable_ppl() = smallJob();
  ASSERT_EQ(stub_->SubmitJob(callContext(token_, 10s).get(), req, &job).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  req.clear_ppl();
  req.mutable_generate()->set_top_p(2);
  const auto st = stub_->SubmitJob(callContext(token_, 10s).get(), req, &job);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("top_p"), std::string::npos) << st.error_message();
}

TEST_F(ControlPlane, ForgedGenerationResultsFailTheJob) {
  auto worker = v1::WorkerApi::NewStub(launcher::makeChannel(address(), ""));
  const std::string me = registerAs(*worker, "forger");
  const std::string model = std::filesystem::canonical("models/kvtp-opt-3m").string();
  const auto good = [&] {
    return nlohmann::json{{"sequences", {{{"ids", {5, 6, 7}}, {"text", "abc"}, {"finish", "length"}}}},
                          {"new_tokens", 3}, {"model", model}, {"device", "cpu"}, {"kv", "full"}, {"tp", 1}};
  };
  std::vector<std::pair<std::string, std::string>> forged = {
      {"{", "not JSON"},
      {[&] { auto r = good(); r["sequences"][0]["ids"] = {1, 2, 3, 4, 5}; r["new_tokens"] = 5; return r.dump(); }(),
       "new ids (1 to 4 asked)"},
      {[&] { auto r = good(); r["new_tokens"] = 4; return r.dump(); }(), "do not add up"},
      {[&] { auto r = good(); r["sequences"][0]["finish"] = "tired"; return r.dump(); }(), "is not length"},
      {[&] { auto r = good(); r["kv"] = "h2o:budget=0.1"; return r.dump(); }(), "kv \"h2o"},
      {good().dump(), ""}};
  for (auto& [result, says] : forged) {
    v1::SubmitJobRequest req;
    req.mutable_generate()->set_model("models/kvtp-opt-3m");
    req.mutable_generate()->add_prompts("hello");
    req.mutable_generate()->set_max_new_tokens(4);
    v1::Job job;
    ASSERT_TRUE(stub_->SubmitJob(callContext(token_, 10s).get(), req, &job).ok());
    ASSERT_EQ(fetchAs(*worker, me), job.id());
    reportSuccess(*worker, me, job.id(), result);
    const v1::Job j = get(job.id());
    if (says.empty()) {
      EXPECT_EQ(j.state(), v1::SUCCEEDED) << j.error();
      continue;
    }
    EXPECT_EQ(j.state(), v1::FAILED) << result;
    EXPECT_NE(j.error().find(says), std::string::npos) << j.error();
  }
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

// A sweep submitted as a job array runs over two worker groups (one launch, --tp 1) and gives the
// CSV the local `kvtp sweep` gives: the same rows in the same order, the same numbers (tp 1 both
// ways; perplexity to 1e-6, threads may sum in another order), all but the seconds.
TEST_F(ControlPlane, ASweepArrayOverTwoGroupsEqualsTheLocalSweep) {
  test::Process& launch = startWorkers(2, "--tp 1");
  EXPECT_TRUE(launch.waitForLog("registered as w2", 20s)) << launch.log();
  const std::string grid =
      " --model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz --seq-len 96 --max-windows 2 --methods "
      "h2o,streamingllm --budgets 0.3,0.6 --quants 'kivi:bits=4,group=8,residual=16' --extra 'h2o:budget=0.4,scope=layer|int8'";
  const auto remote = test::run(test::kvtpBinary() + " submit sweep --coordinator " + address() + " --token-file " +
                                (dir_ / "token") + " --wait --out " + (dir_ / "remote") + grid);
  ASSERT_EQ(remote.status, 0) << remote.err;
  EXPECT_NE(remote.err.find("7 of 7 runs ended"), std::string::npos) << remote.err;
  const auto local = test::run(test::kvtpBinary() + " sweep --out " + (dir_ / "local") + grid);
  ASSERT_EQ(local.status, 0) << local.err;
  const auto rows = [](const std::string& path) {
    std::ifstream in(path);
    std::vector<std::vector<std::string>> out;
    for (std::string line; std::getline(in, line);) {
      std::vector<std::string> fields(1);  // no field here holds a quote: split on commas outside quotes
      bool quoted = false;
      for (char c : line) {
        if (c == '"') quoted = !quoted;
        else if (c == ',' && !quoted) fields.emplace_back();
        else fields.back() += c;
      }
      out.push_back(fields);
    }
    return out;
  };
  const auto a = rows(dir_ / "remote.csv"), b = rows(dir_ / "local.csv");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].size(), 11u);
    for (int f : {0, 1, 2, 4, 5, 6, 9}) EXPECT_EQ(a[i][f], b[i][f]) << "row " << i << " column " << f;
    if (i == 0) continue;
    for (int f : {3, 7, 10}) EXPECT_NEAR(std::stod(a[i][f]), std::stod(b[i][f]), 1e-6 * std::stod(b[i][f])) << "row " << i;
  }
  // Every run was a job of the array, and both groups took some.
  v1::ListJobsResponse list;
  ASSERT_TRUE(stub_->ListJobs(callContext(token_, 10s).get(), {}, &list).ok());
  std::set<std::string> workers;
  for (const auto& j : list.jobs()) {
    EXPECT_EQ(j.array_id(), "array-1");
    workers.insert(j.worker());
  }
  EXPECT_EQ(list.jobs_size(), 7);
  EXPECT_EQ(workers.size(), 2u);
  // The files again from the array alone, as another client would fetch them.
  const auto again = test::run(test::kvtpBinary() + " sweep --array array-1 --coordinator " + address() + " --token-file " +
                               (dir_ / "token") + " --out " + (dir_ / "again"));
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_EQ(rows(dir_ / "again.csv"), a);
}

// 'all' runs the methods that compress a prompt only when the windows start with one, and
// qfilters only where the model has its filters.
TEST(Sweep, AllHasThePromptMethodsOnlyWithAPrompt) {
  launcher::SweepGrid g;
  g.methods = "all", g.budgets = "0.2", g.quants = "";
  auto labels = [&](bool prompt, bool query_filters = false) {
    std::set<std::string> l;
    for (const auto& r : launcher::sweepRuns(g, {prompt, query_filters})) l.insert(r.label);
    return l;
  };
  const auto with = labels(true), without = labels(false);
  EXPECT_FALSE(with.count("qfilters"));
  EXPECT_TRUE(labels(false, true).count("qfilters"));
  PplJob job;
  job.model_dir = "models/kvtp-llama-2m";
  EXPECT_TRUE(launcher::sweepContext(job, false).query_filters);
  job.model_dir = "tests/fixtures/models/llama3-gqa";
  EXPECT_FALSE(launcher::sweepContext(job, false).query_filters);
  job.model_dir = "/a/folder/only/the/coordinator/has";  // read only for caps
  EXPECT_NO_THROW(launcher::sweepContext(job, false));
  EXPECT_THROW(launcher::sweepContext(job, true), Error);
  for (const char* m : {"snapkv", "pyramidkv", "noncausal", "compactor", "finch"}) {
    EXPECT_TRUE(with.count(m)) << m;
    EXPECT_FALSE(without.count(m)) << m;
  }
  for (const char* m : {"h2o", "tova", "expected", "random"}) EXPECT_TRUE(without.count(m) && with.count(m)) << m;
}

// --caps: each budget becomes a cap of bytes, its share of one window's full cache (here the
// bundled Llama's: 4 layers x 2 KV heads x 1024 tokens x 2 x 32 channels x 2 bytes = 1 MiB).
TEST(Sweep, CapsAreSharesOfAWindowsFullCache) {
  launcher::SweepGrid g;
  g.methods = "h2o", g.budgets = "0.2,0.05", g.quants = "", g.ladder = "fp16/kivi2", g.caps = true;
  PplJob job;
  job.model_dir = "models/kvtp-llama-2m", job.seq_len = 1024;
  const auto context = launcher::sweepContext(job, true);
  EXPECT_EQ(context.window_cache_bytes, 1 << 20);
  std::vector<std::string> kv;
  for (const auto& r : launcher::sweepRuns(g, context)) kv.push_back(r.kv);
  EXPECT_EQ(kv, (std::vector<std::string>{"", "h2o:bytes=209715", "h2o:bytes=52429",
                                          "h2o:bytes=209715,ladder=fp16/kivi2", "h2o:bytes=52429,ladder=fp16/kivi2"}));
}

TEST(Csv, FieldsAreQuotedPerRfc4180) {
  EXPECT_EQ(launcher::csvLine({"a", "b,c", "say \"hi\"", "", "x\ny"}), "a,\"b,c\",\"say \"\"hi\"\"\",,\"x\ny\"");
}

}  // namespace
}  // namespace kvtp
