#include "launcher/worker.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <functional>
#include <mutex>
#include <thread>

#include "comm/communicator.h"
#include "launcher/grpc_common.h"
#include "runtime/error.h"
#include "runtime/gpu_engine.h"
#include "runtime/tokenizer.h"

namespace kvtp::launcher {
namespace {

std::atomic<bool> g_stop{false};
void onSignal(int) { g_stop = true; }

using namespace std::chrono_literals;

// Rank 0's connection to the coordinator. Re-registers whenever the coordinator no longer knows
// it (after a coordinator restart), telling it which job it is still running.
class Link {
 public:
  Link(const WorkerOptions& o, int tp, std::string host)
      : stub_(v1::WorkerApi::NewStub(makeChannel(o.coordinator, o.tls_ca))), token_(readToken(o.token_file)),
        tp_(tp), host_(std::move(host)) {}

  void registerUntilDone() {
    for (bool logged = false; !g_stop;) {
      v1::RegisterRequest req;
      req.set_tp(tp_);
      req.set_host(host_);
      req.set_devices(cudaDevices() > 0 ? "cpu,cuda x" + std::to_string(cudaDevices()) : "cpu");
      req.set_memory_bytes(int64_t(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE));
      req.set_current_job(currentJob());
      v1::RegisterResponse resp;
      const auto st = stub_->Register(callContext(token_, 5s).get(), req, &resp);
      if (st.ok()) {
        std::lock_guard<std::mutex> lk(mu_);
        id_ = resp.worker_id();
        heartbeat_ms_ = std::max(100, resp.heartbeat_ms());
        std::fprintf(stderr, "worker: registered as %s\n", id_.c_str());
        return;
      }
      if (st.error_code() == grpc::StatusCode::UNAUTHENTICATED || st.error_code() == grpc::StatusCode::INVALID_ARGUMENT)
        throw Error("coordinator refused registration: " + st.error_message());
      if (!logged) std::fprintf(stderr, "worker: coordinator unreachable (%s); retrying\n", st.error_message().c_str());
      logged = true;
      std::this_thread::sleep_for(1s);
    }
  }

  void heartbeatLoop() {
    while (!g_stop) {
      v1::HeartbeatRequest req;
      req.set_worker_id(id());
      req.set_current_job(currentJob());
      v1::HeartbeatResponse resp;
      const auto st = stub_->Heartbeat(callContext(token_, 5s).get(), req, &resp);
      if (st.error_code() == grpc::StatusCode::NOT_FOUND) registerUntilDone();
      int ms;
      {
        std::lock_guard<std::mutex> lk(mu_);
        ms = heartbeat_ms_;
      }
      for (int t = 0; t < ms && !g_stop; t += 50) std::this_thread::sleep_for(50ms);
    }
  }

  // A job to run, or an empty one after waiting a while.
  v1::Job fetch() {
    v1::FetchJobRequest req;
    req.set_worker_id(id());
    req.set_wait_ms(2000);
    v1::FetchJobResponse resp;
    const auto st = stub_->FetchJob(callContext(token_, 10s).get(), req, &resp);
    if (st.error_code() == grpc::StatusCode::NOT_FOUND) registerUntilDone();
    else if (!st.ok()) std::this_thread::sleep_for(1s);
    if (st.ok() && !resp.job().id().empty()) setCurrentJob(resp.job().id());
    return st.ok() ? resp.job() : v1::Job{};
  }

  // Returns true if the job should stop (cancelled or no longer ours). A coordinator that cannot
  // be reached does not stop the job.
  bool progress(const std::string& job, const v1::Progress& p) {
    v1::ProgressReport r;
    r.set_worker_id(id());
    r.set_job_id(job);
    *r.mutable_progress() = p;
    v1::ProgressAck ack;
    const auto st = stub_->ReportProgress(callContext(token_, 5s).get(), r, &ack);
    return st.ok() && ack.cancel();
  }

  // Retried (for up to a minute) so that a coordinator restarting meanwhile still gets it.
  void result(const std::string& job, v1::JobState state, const std::string& json, const std::string& error) {
    for (int attempt = 0; attempt < 60; ++attempt) {
      v1::ResultReport r;
      r.set_worker_id(id());
      r.set_job_id(job);
      r.set_state(state);
      r.set_result_json(json);
      r.set_error(error);
      v1::ResultAck ack;
      const auto st = stub_->ReportResult(callContext(token_, 10s).get(), r, &ack);
      if (st.ok()) break;
      if (st.error_code() == grpc::StatusCode::NOT_FOUND) registerUntilDone();
      std::this_thread::sleep_for(1s);
    }
    setCurrentJob("");
  }

 private:
  std::string id() {
    std::lock_guard<std::mutex> lk(mu_);
    return id_;
  }
  std::string currentJob() {
    std::lock_guard<std::mutex> lk(mu_);
    return job_;
  }
  void setCurrentJob(const std::string& j) {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = j;
  }

  std::unique_ptr<v1::WorkerApi::Stub> stub_;
  std::string token_;
  int tp_;
  std::string host_;
  std::mutex mu_;
  std::string id_, job_;
  int heartbeat_ms_ = 1000;
};

v1::Progress toProto(const Progress& p) {
  v1::Progress q;
  q.set_windows_done(p.windows_done);
  q.set_windows_total(p.windows_total);
  q.set_tokens_done(p.tokens_done);
  q.set_tokens_total(p.tokens_total);
  q.set_running_ppl(p.tokens_done ? std::exp(p.nll / double(p.tokens_done)) : 0.0);
  q.set_tokens_per_second(p.seconds > 0 ? double(p.tokens_done) / p.seconds : 0.0);
  q.set_seconds(p.seconds);
  return q;
}

// Rank 0 -> group: the next job (serialized), or a stop message (size -1).
v1::Job receiveJob(comm::Communicator& group, const v1::Job* job, bool* stop) {
  int64_t size = -1;
  std::string bytes;
  if (group.rank() == 0 && job) {
    bytes = job->SerializeAsString();
    size = int64_t(bytes.size());
  }
  group.broadcastIdle(&size, sizeof size, 0);
  *stop = size < 0;
  if (*stop) return {};
  bytes.resize(size_t(size));
  group.broadcast(bytes.data(), bytes.size(), 0);
  v1::Job j;
  j.ParseFromString(bytes);
  return j;
}

}  // namespace

int runWorker(const WorkerOptions& o) {
  if (o.token_file.empty()) throw Error("--token-file is required");
  struct sigaction sa {};
  sa.sa_handler = onSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  const comm::Topology all = comm::makeTopology(o.tp);
  const comm::Topology topo = all.groupOnly();  // this group runs its own jobs
  comm::Communicator& group = *topo.group;
  const bool lead = group.rank() == 0;

  std::unique_ptr<Link> link;
  std::thread heartbeat;
  std::string setup_error;
  if (lead) {
    try {
      link = std::make_unique<Link>(o, group.size(), topo.host);
      link->registerUntilDone();
      heartbeat = std::thread([&] { link->heartbeatLoop(); });
    } catch (const std::exception& e) {
      setup_error = e.what();
    }
  }
  comm::agreeOrThrow(group, setup_error);

  while (true) {
    v1::Job fetched;
    bool have = false;
    if (lead) {
      while (!g_stop && fetched.id().empty()) fetched = link->fetch();
      have = !fetched.id().empty();
    }
    bool stop = false;
    const v1::Job job = receiveJob(group, have ? &fetched : nullptr, &stop);
    if (stop) break;

    bool handed_back = false, cancel = false;
    const auto started = std::chrono::steady_clock::now();
    double last_report = -1;
    // Every rank reaches each progress point; rank 0 reports (at most 4 times a second, and at
    // `last`), decides and tells the others, keeping the last answer in between.
    auto checkpoint = [&](const std::function<v1::Progress()>& report, bool last) {
      uint8_t halt = 0;
      if (lead) {
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        if (seconds - last_report >= 0.25 || last) {
          cancel = link->progress(job.id(), report());
          last_report = seconds;
        }
        halt = cancel ? 1 : (g_stop ? 2 : 0);
      }
      group.broadcast(&halt, 1, 0);
      handed_back = halt == 2;
      if (halt) throw Cancelled();
    };
    try {
      std::string result;
      if (job.has_generate()) {
        const GenerateJob gj = fromRequest(job.generate());
        std::vector<std::string> texts;  // each prompt's streamed text so far
        int64_t tokens = 0;
        const GenerateJobResult r = runGenerateJob(gj, &topo, [&](int sequence, int, const std::string& text) {
          if (size_t(sequence) >= texts.size()) texts.resize(size_t(sequence) + 1);
          texts[size_t(sequence)] += text;
          ++tokens;
          checkpoint(
              [&] {
                v1::Progress p;
                const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
                p.set_tokens_done(tokens);
                p.set_seconds(seconds);
                p.set_tokens_per_second(seconds > 0 ? double(tokens) / seconds : 0.0);
                size_t bytes = 0;  // a progress report stays far below gRPC's 4 MiB message limit
                for (const auto& t : texts) {
                  bytes += t.size();
                  // (protobuf strings must be UTF-8: generated text is, as decoded)
                  p.add_texts(bytes <= (1 << 20) ? replaceInvalidUtf8(t) : std::string());
                }
                return p;
              },
              false);
        });
        result = toJson(gj, r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      } else {
        const PplJob pj = fromRequest(job.request());
        const PplJobResult r = runPplJob(pj, &topo, [&](const Progress& p) {
          checkpoint([&] { return toProto(p); }, p.windows_done == p.windows_total);
        });
        result = toJson(pj, r).dump();
      }
      if (lead) link->result(job.id(), v1::SUCCEEDED, result, "");
    } catch (const Cancelled&) {
      if (lead) link->result(job.id(), handed_back ? v1::QUEUED : v1::CANCELLED, "", handed_back ? "worker stopped" : "");
    } catch (const std::exception& e) {
      if (lead) {
        std::fprintf(stderr, "worker: job %s failed: %s\n", job.id().c_str(), e.what());
        link->result(job.id(), v1::FAILED, "", e.what());
      }
    }
  }
  if (heartbeat.joinable()) heartbeat.join();
  if (lead) std::fprintf(stderr, "worker: stopped\n");
  return 0;
}

}  // namespace kvtp::launcher
