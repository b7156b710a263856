#include "launcher/coordinator.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "launcher/grpc_common.h"
#include "launcher/job_store.h"
#include "runtime/error.h"
#include "kv/policy.h"
#include "runtime/presets.h"

namespace kvtp::launcher {
namespace {

namespace fs = std::filesystem;
using grpc::ServerContext;
using grpc::Status;
using grpc::StatusCode;
using Clock = std::chrono::steady_clock;

int64_t nowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct Worker {
  std::string id;
  v1::RegisterRequest info;
  Clock::time_point last_seen;
};

// All coordinator state behind one mutex; every change bumps `version_` and wakes waiters
// (long-polling workers, watching clients).
class State {
 public:
  State(const CoordinatorOptions& o, JobStore& store) : opts_(o), store_(store) {
    root_ = fs::weakly_canonical(o.data_root);
    for (auto& j : store_.loadAll()) {
      // A job running when the coordinator stopped keeps its worker's id for a grace period: the
      // worker re-registers with it and is re-attached, or the monitor re-queues it.
      if (j.state() == v1::RUNNING) j.set_updated_unix_ms(nowMs());
      jobs_[j.id()] = j;
    }
    next_seq_ = store_.lastSequence() + 1;
  }

  Status submit(const v1::PplRequest& req, v1::Job* out) {
    v1::PplRequest resolved = req;
    if (Status s = validate(resolved); !s.ok()) return s;
    std::lock_guard<std::mutex> lk(mu_);
    v1::Job j;
    j.set_id("job-" + std::to_string(next_seq_++));
    j.set_state(v1::QUEUED);
    *j.mutable_request() = resolved;
    j.set_created_unix_ms(nowMs());
    changed(j);
    *out = j;
    return Status::OK;
  }

  Status get(const std::string& id, v1::Job* out) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return {StatusCode::NOT_FOUND, "no job '" + id.substr(0, 64) + "'"};
    *out = it->second;
    return Status::OK;
  }

  void list(const v1::ListJobsRequest& req, v1::ListJobsResponse* out) {
    const int limit = req.limit() <= 0 ? 100 : std::min(req.limit(), 1000);
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<const v1::Job*> all;
    for (auto& [id, j] : jobs_)
      if (req.state() == v1::JOB_STATE_UNSPECIFIED || j.state() == req.state()) all.push_back(&j);
    std::sort(all.begin(), all.end(), [](auto* a, auto* b) { return a->created_unix_ms() > b->created_unix_ms(); });
    for (size_t i = 0; i < all.size() && int(i) < limit; ++i) *out->add_jobs() = *all[i];
  }

  // Streams the job at every change until it ends, the client goes away, or the server stops.
  Status watch(ServerContext* ctx, const std::string& id, grpc::ServerWriter<v1::Job>* writer) {
    std::unique_lock<std::mutex> lk(mu_);
    int64_t sent_version = -1;
    while (true) {
      auto it = jobs_.find(id);
      if (it == jobs_.end()) return {StatusCode::NOT_FOUND, "no job '" + id.substr(0, 64) + "'"};
      if (version_ != sent_version) {
        const v1::Job snapshot = it->second;
        sent_version = version_;
        lk.unlock();
        if (!writer->Write(snapshot)) return Status::OK;  // the client left
        if (isFinal(snapshot.state())) return Status::OK;
        lk.lock();
        continue;
      }
      if (stopping_) return {StatusCode::UNAVAILABLE, "coordinator shutting down"};
      if (ctx->IsCancelled()) return Status::CANCELLED;
      cv_.wait_for(lk, std::chrono::milliseconds(500));
    }
  }

  Status cancel(const std::string& id, v1::Job* out) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return {StatusCode::NOT_FOUND, "no job '" + id.substr(0, 64) + "'"};
    v1::Job& j = it->second;
    if (isFinal(j.state()))
      return {StatusCode::FAILED_PRECONDITION, "job " + id + " already ended (" + stateName(j.state()) + ")"};
    if (j.state() == v1::QUEUED) {
      j.set_state(v1::CANCELLED);
      changed(j);
    } else {
      cancel_requested_.insert(id);  // the worker hears it at its next progress report
    }
    *out = j;
    return Status::OK;
  }

  // ---- workers
  void registerWorker(const v1::RegisterRequest& req, v1::RegisterResponse* out) {
    std::lock_guard<std::mutex> lk(mu_);
    Worker w;
    w.id = "w" + std::to_string(next_worker_++) + "@" + req.host().substr(0, 64);
    w.info = req;
    w.last_seen = Clock::now();
    workers_[w.id] = w;
    if (!req.current_job().empty()) {  // re-attach a job this group kept running across our restart
      auto it = jobs_.find(req.current_job());
      if (it != jobs_.end() && !isFinal(it->second.state())) {
        it->second.set_state(v1::RUNNING);
        it->second.set_worker(w.id);
        changed(it->second);
      }
    }
    out->set_worker_id(w.id);
    out->set_heartbeat_ms(opts_.heartbeat_ms);
    std::fprintf(stderr, "coordinator: worker %s registered (tp %d, %s)\n", w.id.c_str(), req.tp(), req.devices().c_str());
  }

  Status heartbeat(const v1::HeartbeatRequest& req) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = workers_.find(req.worker_id());
    if (it == workers_.end()) return {StatusCode::NOT_FOUND, "unknown worker: register again"};
    it->second.last_seen = Clock::now();
    return Status::OK;
  }

  Status fetch(ServerContext* ctx, const v1::FetchJobRequest& req, v1::FetchJobResponse* out) {
    const auto until = Clock::now() + std::chrono::milliseconds(std::clamp(req.wait_ms(), 0, 30000));
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      auto w = workers_.find(req.worker_id());
      if (w == workers_.end()) return {StatusCode::NOT_FOUND, "unknown worker: register again"};
      w->second.last_seen = Clock::now();
      v1::Job* pick = nullptr;  // the oldest queued job this group can run
      for (auto& [id, j] : jobs_)
        if (j.state() == v1::QUEUED && (!j.request().tp() || j.request().tp() == w->second.info.tp()) &&
            (!pick || j.created_unix_ms() < pick->created_unix_ms() ||
             (j.created_unix_ms() == pick->created_unix_ms() && id.size() < pick->id().size())))
          pick = &j;
      if (pick) {
        v1::Job& j = *pick;
        j.set_state(v1::RUNNING);
        j.set_worker(w->first);
        j.set_attempts(j.attempts() + 1);
        j.clear_progress();
        changed(j);
        *out->mutable_job() = j;
        return Status::OK;
      }
      if (stopping_ || ctx->IsCancelled() || Clock::now() >= until) return Status::OK;
      cv_.wait_until(lk, std::min(until, Clock::now() + std::chrono::milliseconds(500)));
    }
  }

  bool progress(const v1::ProgressReport& r) {  // returns: should the worker stop?
    std::lock_guard<std::mutex> lk(mu_);
    if (auto w = workers_.find(r.worker_id()); w != workers_.end()) w->second.last_seen = Clock::now();
    auto it = jobs_.find(r.job_id());
    if (it == jobs_.end() || it->second.state() != v1::RUNNING || it->second.worker() != r.worker_id()) return true;
    *it->second.mutable_progress() = r.progress();
    it->second.set_updated_unix_ms(nowMs());
    ++version_;  // progress is streamed, not persisted
    cv_.notify_all();
    return cancel_requested_.count(r.job_id()) > 0;
  }

  void result(const v1::ResultReport& r) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = jobs_.find(r.job_id());
    if (it == jobs_.end() || it->second.state() != v1::RUNNING || it->second.worker() != r.worker_id()) return;
    v1::Job& j = it->second;
    j.set_state(r.state());
    j.set_error(r.error());
    if (r.state() == v1::SUCCEEDED) {
      j.set_result_json(r.result_json());
      try {
        j.set_ppl(nlohmann::json::parse(r.result_json()).value("ppl", 0.0));
      } catch (const std::exception&) {
      }
    }
    if (r.state() == v1::QUEUED) j.clear_worker();  // handed back (worker shutting down)
    cancel_requested_.erase(j.id());
    changed(j);
  }

  // Lost workers: forget them; their jobs are re-queued (until max_attempts starts) or failed.
  void sweep() {
    std::lock_guard<std::mutex> lk(mu_);
    const auto now = Clock::now();
    const auto timeout = std::chrono::milliseconds(opts_.worker_timeout_ms);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (now - it->second.last_seen > timeout) {
        std::fprintf(stderr, "coordinator: worker %s lost (no heartbeat for %d ms)\n", it->first.c_str(),
                     opts_.worker_timeout_ms);
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& [id, j] : jobs_) {
      if (j.state() != v1::RUNNING || workers_.count(j.worker())) continue;
      if (nowMs() - j.updated_unix_ms() < opts_.worker_timeout_ms) continue;  // grace after a restart
      const std::string why = "worker " + j.worker() + " was lost while running the job";
      if (cancel_requested_.erase(id)) {
        j.set_state(v1::CANCELLED);
      } else if (j.attempts() < opts_.max_attempts) {
        j.set_state(v1::QUEUED);
        j.set_error(why + "; re-queued");
      } else {
        j.set_state(v1::FAILED);
        j.set_error(why + " (attempt " + std::to_string(j.attempts()) + " of " + std::to_string(opts_.max_attempts) + ")");
      }
      j.clear_worker();
      changed(j);
    }
  }

  void stop() {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    cv_.notify_all();
  }

 private:
  void changed(v1::Job& j) {  // caller holds mu_
    j.set_updated_unix_ms(nowMs());
    jobs_[j.id()] = j;
    store_.save(j);
    ++version_;
    cv_.notify_all();
  }

  // Resolves a path against the data root; it must exist and stay inside the root.
  Status resolve(std::string* path, const char* field) {
    if (path->size() > 4096) return {StatusCode::INVALID_ARGUMENT, std::string(field) + " is longer than 4096 bytes"};
    fs::path p(*path);
    if (p.is_relative()) p = root_ / p;
    std::error_code ec;
    const fs::path real = fs::canonical(p, ec);
    if (ec) return {StatusCode::NOT_FOUND, std::string(field) + " '" + *path + "' does not exist under the data root"};
    const auto rel = real.lexically_relative(root_);
    if (rel.empty() || *rel.begin() == "..")
      return {StatusCode::INVALID_ARGUMENT, std::string(field) + " '" + *path + "' is outside the data root"};
    *path = real.string();
    return Status::OK;
  }

  Status validate(v1::PplRequest& r) {
    auto bad = [](const std::string& m) { return Status(StatusCode::INVALID_ARGUMENT, m); };
    if (r.model().empty() == r.synthetic().empty()) return bad("give exactly one of model and synthetic");
    if (r.data().empty() == r.input_ids().empty()) return bad("give exactly one of data and input_ids");
    if (!r.synthetic().empty() && !r.data().empty()) return bad("synthetic weights have no tokenizer: use input_ids");
    if (!r.mode().empty() && r.mode() != "prefill" && r.mode() != "decode") return bad("mode must be prefill or decode");
    if (!r.preset().empty() && r.preset() != "default" && r.preset() != "gptq") return bad("preset must be default or gptq");
    if (r.seq_len() != 0 && (r.seq_len() < 2 || r.seq_len() > (1 << 20))) return bad("seq_len must be 0 or in [2, 1048576]");
    if (r.stride() < 0 || r.max_windows() < 0 || r.max_docs() < 0 || r.layers() < 0) return bad("negative count");
    if (r.tp() < 0 || r.tp() > 65536) return bad("tp must be in [0, 65536]");
    if (r.join().size() > 4096) return bad("join is longer than 4096 bytes");
    if (r.prefill() < 0) return bad("prefill must not be negative");
    if (r.batch() < 0 || r.batch() > 256) return bad("batch must be in [0, 256]");
    if (r.batch() > 1 && (r.mode() != "decode" || r.device() != "cuda"))
      return bad("batch > 1 decodes several windows together: set mode to decode and device to cuda");
    if (!r.device().empty() && r.device() != "cpu" && r.device() != "cuda") return bad("device must be cpu or cuda");
    if (!r.dtype().empty() && r.dtype() != "fp32" && r.dtype() != "fp16" && r.dtype() != "bf16")
      return bad("dtype must be fp32, fp16 or bf16");
    try {
      const kv::PolicySpec spec = kv::parsePolicy(r.kv(), r.kv_quant(), r.kv_lowrank());
      if ((spec.compresses() || r.prefill() > 0) && r.mode() != "decode")
        return bad("kv, kv_quant, kv_lowrank and prefill evaluate token by token: set mode to decode");
    } catch (const std::invalid_argument& e) {
      return bad(e.what());
    }
    if (!r.model().empty()) {
      if (Status s = resolve(r.mutable_model(), "model"); !s.ok()) return s;
    } else {
      const auto names = presetNames();
      if (std::find(names.begin(), names.end(), r.synthetic()) == names.end())
        if (Status s = resolve(r.mutable_synthetic(), "synthetic config"); !s.ok()) return s;
    }
    if (!r.data().empty())
      if (Status s = resolve(r.mutable_data(), "data"); !s.ok()) return s;
    if (!r.input_ids().empty())
      if (Status s = resolve(r.mutable_input_ids(), "input_ids"); !s.ok()) return s;
    return Status::OK;
  }

  const CoordinatorOptions& opts_;
  JobStore& store_;
  fs::path root_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, v1::Job> jobs_;
  std::map<std::string, Worker> workers_;
  std::set<std::string> cancel_requested_;
  int64_t next_seq_ = 1, next_worker_ = 1, version_ = 0;
  bool stopping_ = false;
};

class CoordinatorService final : public v1::Coordinator::Service {
 public:
  CoordinatorService(State& s, std::string token) : s_(s), token_(std::move(token)) {}
  Status SubmitJob(ServerContext* ctx, const v1::SubmitJobRequest* req, v1::Job* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.submit(req->ppl(), out);
  }
  Status GetJob(ServerContext* ctx, const v1::GetJobRequest* req, v1::Job* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.get(req->id(), out);
  }
  Status ListJobs(ServerContext* ctx, const v1::ListJobsRequest* req, v1::ListJobsResponse* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    s_.list(*req, out);
    return Status::OK;
  }
  Status WatchJob(ServerContext* ctx, const v1::WatchJobRequest* req, grpc::ServerWriter<v1::Job>* w) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.watch(ctx, req->id(), w);
  }
  Status CancelJob(ServerContext* ctx, const v1::CancelJobRequest* req, v1::Job* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.cancel(req->id(), out);
  }

 private:
  State& s_;
  std::string token_;
};

class WorkerService final : public v1::WorkerApi::Service {
 public:
  WorkerService(State& s, std::string token) : s_(s), token_(std::move(token)) {}
  Status Register(ServerContext* ctx, const v1::RegisterRequest* req, v1::RegisterResponse* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    if (req->tp() < 1) return {StatusCode::INVALID_ARGUMENT, "tp must be at least 1"};
    s_.registerWorker(*req, out);
    return Status::OK;
  }
  Status Heartbeat(ServerContext* ctx, const v1::HeartbeatRequest* req, v1::HeartbeatResponse*) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.heartbeat(*req);
  }
  Status FetchJob(ServerContext* ctx, const v1::FetchJobRequest* req, v1::FetchJobResponse* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    return s_.fetch(ctx, *req, out);
  }
  Status ReportProgress(ServerContext* ctx, const v1::ProgressReport* req, v1::ProgressAck* out) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    out->set_cancel(s_.progress(*req));
    return Status::OK;
  }
  Status ReportResult(ServerContext* ctx, const v1::ResultReport* req, v1::ResultAck*) override {
    if (Status a = checkToken(ctx, token_); !a.ok()) return a;
    if (!isFinal(req->state()) && req->state() != v1::QUEUED)
      return {StatusCode::INVALID_ARGUMENT, "a result must be SUCCEEDED, FAILED, CANCELLED or QUEUED"};
    s_.result(*req);
    return Status::OK;
  }

 private:
  State& s_;
  std::string token_;
};

}  // namespace

int runCoordinator(const CoordinatorOptions& o) {
  if (o.token_file.empty()) throw Error("--token-file is required: every call must carry the shared token");
  if (o.data_root.empty() || !fs::is_directory(o.data_root))
    throw Error("--data-root '" + o.data_root + "' is not a folder");
  const std::string token = readToken(o.token_file);

  // SIGTERM / SIGINT are taken by a thread of our own (sigwait), not by a handler.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  JobStore store(o.db);
  State state(o, store);
  CoordinatorService clients(state, token);
  WorkerService workers(state, token);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(o.listen, serverCredentials(o.tls_cert, o.tls_key), &port);
  builder.RegisterService(&clients);
  builder.RegisterService(&workers);
  builder.SetMaxReceiveMessageSize(1 << 20);  // requests are small; larger ones are refused
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) throw Error("cannot listen on '" + o.listen + "'");
  std::fprintf(stderr, "coordinator: listening on %s (port %d), jobs in %s\n", o.listen.c_str(), port, o.db.c_str());

  std::atomic<bool> done{false};
  std::thread monitor([&] {
    while (!done) {
      state.sweep();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (done) return;
    std::fprintf(stderr, "coordinator: signal %d, shutting down\n", sig);
    state.stop();
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  });
  server->Wait();  // returns once the signal thread has shut the server down
  done = true;
  monitor.join();
  signals.join();
  std::fprintf(stderr, "coordinator: stopped\n");
  return 0;
}

}  // namespace kvtp::launcher
