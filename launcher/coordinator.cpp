#include "launcher/coordinator.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "launcher/coordinator_metrics.h"
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

// `text` as a JSON object holding every one of `keys` in *r, or why it is not one.
std::string parseResult(const std::string& text, std::initializer_list<const char*> keys, nlohmann::json* r) {
  try {
    *r = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return std::string("not JSON (") + e.what() + ")";
  }
  if (!r->is_object()) return "not a JSON object";
  for (const char* key : keys)
    if (!r->contains(key)) return std::string("no '") + key + "'";
  return "";
}

// Why result r was not run for request q (a PplRequest or GenerateRequest): its model, device, kv
// and the extra `same` fields must be the request's, its tp the request's and the group's.
template <class Request>
std::string checkSameJob(const nlohmann::json& r, const Request& q, int group_tp,
                         std::vector<std::pair<const char*, std::string>> same) {
  std::string kv;
  try {
    kv = kv::parsePolicy(q.kv(), q.kv_quant(), q.kv_lowrank()).describe();
  } catch (const std::exception&) {
  }
  same.push_back({"model", q.model().empty() ? "synthetic:" + q.synthetic() : q.model()});
  same.push_back({"device", q.device().empty() ? "cpu" : q.device()});
  same.push_back({"kv", kv});
  for (auto& [key, want] : same)
    if (r[key] != want) return std::string(key) + " " + r[key].dump() + " is not the job's (\"" + want + "\")";
  const int tp = r["tp"].get<int>();
  if ((q.tp() && tp != q.tp()) || (group_tp && tp != group_tp))
    return "tp " + std::to_string(tp) + " is not the worker group's (" + std::to_string(group_tp) + ")";
  return "";
}

// Why a worker's result for job j cannot be stored ("" if it can, its perplexity in *ppl_out):
// it must be the `kvtp ppl --json` object of that job, run by a group of `group_tp` ranks,
// consistent with itself and with the plan the worker reported in its progress (tokens and
// windows).
std::string checkResult(const v1::Job& j, int group_tp, const std::string& text, double* ppl_out) {
  nlohmann::json r;
  if (std::string why = parseResult(
          text, {"ppl", "nll", "tokens", "windows", "tp", "sequences", "model", "data", "mode", "device", "kv"}, &r);
      !why.empty())
    return why;
  if (!r["ppl"].is_number() || !r["nll"].is_number() || !r["tokens"].is_number_integer() ||
      !r["windows"].is_number_integer() || !r["tp"].is_number_integer() || !r["sequences"].is_array())
    return "ppl, nll, tokens, windows, tp or sequences has the wrong type";
  const double ppl = r["ppl"].get<double>(), nll = r["nll"].get<double>();
  const int64_t tokens = r["tokens"].get<int64_t>();
  if (!std::isfinite(ppl) || ppl <= 0) return "perplexity " + r["ppl"].dump() + " is not finite and positive";
  if (tokens <= 0) return "no tokens scored";
  if (!std::isfinite(nll) || std::abs(std::exp(nll / double(tokens)) - ppl) > 1e-9 * ppl + 1e-12)
    return "ppl " + r["ppl"].dump() + " is not exp(nll / tokens)";
  int64_t summed = 0;
  for (const auto& s : r["sequences"]) summed += s.is_object() && s.value("tokens", int64_t(0)) > 0 ? s["tokens"].get<int64_t>() : 0;
  if (summed != tokens || int64_t(r["sequences"].size()) != r["windows"].get<int64_t>())
    return "the windows' tokens do not add up to the result's";
  const v1::PplRequest& q = j.request();
  if (std::string why = checkSameJob(r, q, group_tp,
                                     {{"data", q.data().empty() ? q.input_ids() : q.data()},
                                      {"mode", q.mode().empty() ? "prefill" : q.mode()}});
      !why.empty())
    return why;
  const v1::Progress& p = j.progress();  // the plan the worker reported
  if (p.tokens_total() && (tokens != p.tokens_total() || r["windows"].get<int64_t>() != p.windows_total()))
    return std::to_string(tokens) + " tokens in " + r["windows"].dump() + " windows, but the worker planned " +
           std::to_string(p.tokens_total()) + " in " + std::to_string(p.windows_total());
  *ppl_out = ppl;
  return "";
}

// Why a worker's result for generation job j cannot be stored ("" if it can): it must be the
// `kvtp generate --json` object of that job, run by a group of `group_tp` ranks.
std::string checkGeneration(const v1::Job& j, int group_tp, const std::string& text) {
  nlohmann::json r;
  if (std::string why = parseResult(text, {"sequences", "new_tokens", "model", "device", "kv", "tp"}, &r); !why.empty())
    return why;
  if (!r["sequences"].is_array() || r["sequences"].empty() || !r["new_tokens"].is_number_integer() ||
      !r["tp"].is_number_integer())
    return "sequences, new_tokens or tp has the wrong type";
  const v1::GenerateRequest& q = j.generate();
  const int64_t most = q.max_new_tokens() ? q.max_new_tokens() : 64;
  int64_t summed = 0;
  for (const auto& s : r["sequences"]) {
    if (!s.is_object() || !s.contains("ids") || !s["ids"].is_array() || !s.contains("text") || !s["text"].is_string() ||
        !s.contains("finish") || !s["finish"].is_string())
      return "a sequence lacks ids, text or finish";
    for (const auto& id : s["ids"])
      if (!id.is_number_integer() || id.get<int64_t>() < 0) return "a sequence's ids are not token ids";
    const std::string finish = s["finish"];
    if (finish != "length" && finish != "eos" && finish != "stop" && finish != "context")
      return "finish '" + finish.substr(0, 32) + "' is not length, eos, stop or context";
    if (int64_t(s["ids"].size()) > most || s["ids"].empty())
      return "a sequence has " + std::to_string(s["ids"].size()) + " new ids (1 to " + std::to_string(most) + " asked)";
    summed += int64_t(s["ids"].size());
  }
  if (summed != r["new_tokens"].get<int64_t>()) return "the sequences' ids do not add up to new_tokens";
  return checkSameJob(r, q, group_tp, {});
}

// The tensor-parallel size a job asks for (0: any group).
int jobTp(const v1::Job& j) { return j.has_generate() ? j.generate().tp() : j.request().tp(); }

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
      next_array_ = std::max(next_array_, sequence(j.array_id()) + 1);
      jobs_[j.id()] = j;
    }
    next_seq_ = store_.lastSequence() + 1;
  }

  Status submit(const Caller& who, const v1::SubmitJobRequest& req, v1::Job* out) {
    if (req.has_ppl() == req.has_generate())
      return {StatusCode::INVALID_ARGUMENT, "give exactly one of ppl and generate"};
    v1::Job j;
    if (req.has_ppl()) {
      *j.mutable_request() = req.ppl();
      if (Status s = validate(*j.mutable_request()); !s.ok()) return s;
    } else {
      *j.mutable_generate() = req.generate();
      if (Status s = validate(*j.mutable_generate()); !s.ok()) return s;
    }
    std::lock_guard<std::mutex> lk(mu_);
    *out = queue(who, std::move(j), "", "");
    return Status::OK;
  }

  // All runs validated before any is queued: a sweep is queued whole or not at all.
  Status submitSweep(const Caller& who, const v1::SubmitSweepRequest& req, v1::JobArray* out) {
    if (req.runs_size() < 1 || req.runs_size() > 1000)
      return {StatusCode::INVALID_ARGUMENT, "a sweep needs 1 to 1000 runs (has " + std::to_string(req.runs_size()) + ")"};
    std::vector<v1::Job> runs;
    for (const auto& run : req.runs()) {
      v1::Job j;
      v1::PplRequest& r = *j.mutable_request() = req.base();
      r.set_kv(run.kv()), r.set_kv_quant(run.kv_quant()), r.set_mode("decode");
      if (Status s = validate(r); !s.ok())
        return {s.error_code(), "run '" + run.label().substr(0, 200) + "': " + s.error_message()};
      runs.push_back(std::move(j));
    }
    std::lock_guard<std::mutex> lk(mu_);
    out->set_array_id("array-" + std::to_string(next_array_++));
    for (size_t i = 0; i < runs.size(); ++i)
      *out->add_jobs() = queue(who, std::move(runs[i]), out->array_id(), req.runs(i).label());
    return Status::OK;
  }

  Status array(const std::string& id, v1::JobArray* out) {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<const v1::Job*> jobs;
    for (auto& [job_id, j] : jobs_)
      if (!id.empty() && j.array_id() == id) jobs.push_back(&j);
    if (jobs.empty()) return {StatusCode::NOT_FOUND, "no job array '" + id.substr(0, 64) + "'"};
    std::sort(jobs.begin(), jobs.end(), [](auto* a, auto* b) { return sequence(a->id()) < sequence(b->id()); });
    out->set_array_id(id);
    for (auto* j : jobs) *out->add_jobs() = *j;
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

  Status cancel(const Caller& who, const std::string& id, v1::Job* out) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return {StatusCode::NOT_FOUND, "no job '" + id.substr(0, 64) + "'"};
    v1::Job& j = it->second;
    if (who.role != Role::Admin && j.owner() != who.name)
      return {StatusCode::PERMISSION_DENIED, id + " was submitted by '" + j.owner() + "'; only it or an admin can cancel it"};
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
    // Unguessable (the lease of a fetched job is bound to it), still readable in logs.
    std::random_device entropy;
    char secret[33];
    for (int i = 0; i < 4; ++i) std::snprintf(secret + 8 * i, 9, "%08x", unsigned(entropy()));
    w.id = "w" + std::to_string(next_worker_++) + "-" + secret + "@" + req.host().substr(0, 64);
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
    // A job this worker holds but says it no longer runs (it stopped it while cut off, and was
    // given it back when it registered again) goes back to the queue rather than stay RUNNING.
    // Quiet for a few heartbeats first: a heartbeat may leave before the worker sees its fetch.
    for (auto& [id, j] : jobs_)
      if (j.state() == v1::RUNNING && j.worker() == req.worker_id() && req.current_job() != id &&
          nowMs() - j.updated_unix_ms() > 3 * int64_t(opts_.heartbeat_ms)) {
        requeue(j, "worker " + req.worker_id() + " no longer runs the job");
        changed(j);
      }
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
        if (j.state() == v1::QUEUED && (!jobTp(j) || jobTp(j) == w->second.info.tp()) &&
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
    // A worker also stops a job it is told is no longer its (it was cut off, the job re-queued,
    // and it came back) and reports it CANCELLED; only a client's cancel ends a job so: otherwise
    // the job goes back to the queue.
    const bool cancelled = r.state() == v1::CANCELLED && cancel_requested_.count(j.id());
    j.set_state(r.state() == v1::CANCELLED && !cancelled ? v1::QUEUED : r.state());
    j.set_error(r.error());
    if (r.state() == v1::SUCCEEDED) {
      const auto w = workers_.find(r.worker_id());
      double ppl = 0;
      const int group_tp = w == workers_.end() ? 0 : w->second.info.tp();
      const std::string wrong = j.has_generate() ? checkGeneration(j, group_tp, r.result_json())
                                                 : checkResult(j, group_tp, r.result_json(), &ppl);
      if (wrong.empty()) {
        j.set_result_json(r.result_json());
        j.set_ppl(ppl);
      } else {
        j.set_state(v1::FAILED);
        j.set_error("the worker's result was rejected: " + wrong);
        std::fprintf(stderr, "coordinator: %s: %s\n", j.id().c_str(), j.error().c_str());
      }
    }
    if (j.state() == v1::QUEUED) j.clear_worker();  // handed back (worker shutting down or cut off)
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
      requeue(j, "worker " + j.worker() + " was lost while running the job");
      changed(j);
    }
  }

  void stop() {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    cv_.notify_all();
  }

  // The metrics endpoint's view: jobs by state, worker groups, tokens/s, jobs ended since last.
  void report(CoordinatorMetrics& m) {
    std::lock_guard<std::mutex> lk(mu_);
    std::map<std::string, int> by_state;
    double tokens_per_second = 0;
    for (auto& [id, j] : jobs_) {
      ++by_state[stateName(j.state())];
      if (j.state() == v1::RUNNING) tokens_per_second += j.progress().tokens_per_second();
    }
    m.set(by_state, int(workers_.size()), tokens_per_second);
    for (double seconds : ended_latencies_) m.jobEnded(seconds);
    ended_latencies_.clear();
  }

 private:
  // A running job whose worker is gone: queued again until max_attempts starts, then FAILED;
  // CANCELLED if a client asked for that meanwhile (caller holds mu_, then calls changed()).
  void requeue(v1::Job& j, const std::string& why) {
    if (cancel_requested_.erase(j.id())) {
      j.set_state(v1::CANCELLED);
    } else if (j.attempts() < opts_.max_attempts) {
      j.set_state(v1::QUEUED);
      j.set_error(why + "; re-queued");
    } else {
      j.set_state(v1::FAILED);
      j.set_error(why + " (attempt " + std::to_string(j.attempts()) + " of " + std::to_string(opts_.max_attempts) + ")");
    }
    j.clear_worker();
  }

  // A new queued job, `j` holding its validated request (caller holds mu_).
  v1::Job queue(const Caller& who, v1::Job j, const std::string& array_id, const std::string& label) {
    j.set_id("job-" + std::to_string(next_seq_++));
    j.set_state(v1::QUEUED);
    j.set_owner(who.name);
    j.set_array_id(array_id);
    j.set_label(label);
    j.set_created_unix_ms(nowMs());
    changed(j);
    return j;
  }
  // "job-12" -> 12, "array-3" -> 3: ids sort in creation order by it.
  static int64_t sequence(const std::string& id) {
    const auto dash = id.rfind('-');
    return dash == std::string::npos ? 0 : std::atoll(id.c_str() + dash + 1);
  }

  void changed(v1::Job& j) {  // caller holds mu_
    j.set_updated_unix_ms(nowMs());
    // A job reaches a final state once (nothing changes an ended job), here.
    if (isFinal(j.state())) ended_latencies_.push_back(double(j.updated_unix_ms() - j.created_unix_ms()) / 1000.0);
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

  Status resolveIfSet(std::string* path, const char* field) { return path->empty() ? Status::OK : resolve(path, field); }

  // A model folder under the data root, or a synthetic preset's name (or a config.json under it).
  Status resolveModel(std::string* model, std::string* synthetic) {
    if (!model->empty()) return resolve(model, "model");
    const auto names = presetNames();
    if (std::find(names.begin(), names.end(), *synthetic) != names.end()) return Status::OK;
    return resolve(synthetic, "synthetic config");
  }

  static Status checkDevice(const std::string& device, const std::string& dtype) {
    if (!device.empty() && device != "cpu" && device != "cuda")
      return {StatusCode::INVALID_ARGUMENT, "device must be cpu or cuda"};
    if (!dtype.empty() && dtype != "fp32" && dtype != "fp16" && dtype != "bf16")
      return {StatusCode::INVALID_ARGUMENT, "dtype must be fp32, fp16 or bf16"};
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
    if (Status s = checkDevice(r.device(), r.dtype()); !s.ok()) return s;
    try {
      const kv::PolicySpec spec = kv::parsePolicy(r.kv(), r.kv_quant(), r.kv_lowrank());
      if ((spec.compresses() || r.prefill() > 0) && r.mode() != "decode")
        return bad("kv, kv_quant, kv_lowrank and prefill evaluate token by token: set mode to decode");
    } catch (const std::invalid_argument& e) {
      return bad(e.what());
    }
    if (Status s = resolveModel(r.mutable_model(), r.mutable_synthetic()); !s.ok()) return s;
    if (Status s = resolveIfSet(r.mutable_data(), "data"); !s.ok()) return s;
    if (Status s = resolveIfSet(r.mutable_input_ids(), "input_ids"); !s.ok()) return s;
    return Status::OK;
  }

  Status validate(v1::GenerateRequest& r) {
    auto bad = [](const std::string& m) { return Status(StatusCode::INVALID_ARGUMENT, m); };
    if (r.model().empty() == r.synthetic().empty()) return bad("give exactly one of model and synthetic");
    const bool texts = r.prompts_size() > 0 || !r.prompts_file().empty();
    if (texts == !r.input_ids().empty()) return bad("give the prompts as text (prompts, prompts_file) or as input_ids");
    if (!r.synthetic().empty() && texts) return bad("synthetic weights have no tokenizer: use input_ids");
    if (r.prompts_size() > 1000) return bad("at most 1000 prompts (use prompts_file for more)");
    for (const auto& p : r.prompts())
      if (p.size() > (1 << 20)) return bad("a prompt is longer than 1 MiB");
    if (r.stop_size() > 16) return bad("at most 16 stop strings");
    for (const auto& s : r.stop())
      if (s.empty() || s.size() > 1024) return bad("a stop string must have 1 to 1024 bytes");
    if (r.max_new_tokens() < 0 || r.max_new_tokens() > (1 << 20)) return bad("max_new_tokens must be in [0, 1048576]");
    if (!(r.temperature() >= 0) || !std::isfinite(r.temperature())) return bad("temperature must be 0 or positive");
    if (r.top_k() < 0) return bad("top_k must not be negative");
    if (!(r.top_p() >= 0 && r.top_p() <= 1)) return bad("top_p must be in [0, 1]");
    if (r.layers() < 0) return bad("negative count");
    if (r.tp() < 0 || r.tp() > 65536) return bad("tp must be in [0, 65536]");
    if (r.batch() < 0 || r.batch() > 256) return bad("batch must be in [0, 256]");
    if (r.batch() > 1 && r.device() != "cuda") return bad("batch > 1 generates several prompts together: set device to cuda");
    if (Status s = checkDevice(r.device(), r.dtype()); !s.ok()) return s;
    try {
      kv::parsePolicy(r.kv(), r.kv_quant(), r.kv_lowrank());
    } catch (const std::invalid_argument& e) {
      return bad(e.what());
    }
    if (Status s = resolveModel(r.mutable_model(), r.mutable_synthetic()); !s.ok()) return s;
    if (Status s = resolveIfSet(r.mutable_prompts_file(), "prompts_file"); !s.ok()) return s;
    if (Status s = resolveIfSet(r.mutable_input_ids(), "input_ids"); !s.ok()) return s;
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
  std::vector<double> ended_latencies_;  // seconds from submit to end, not yet reported
  int64_t next_seq_ = 1, next_array_ = 1, next_worker_ = 1, version_ = 0;
  bool stopping_ = false;
};

// The caller of a Coordinator call, if a client whose role is at least `least`.
Status clientAtLeast(const Credentials& creds, ServerContext* ctx, Role least, Caller* who) {
  if (Status a = creds.identify(ctx, who); !a.ok()) return a;
  if (who->role == Role::Worker) return {StatusCode::PERMISSION_DENIED, "a worker credential cannot call the Coordinator service"};
  if (int(who->role) < int(least))
    return {StatusCode::PERMISSION_DENIED, "client '" + who->name + "' may only read (its role in --client-tokens)"};
  return Status::OK;
}

class CoordinatorService final : public v1::Coordinator::Service {
 public:
  CoordinatorService(State& s, const Credentials& creds) : s_(s), creds_(creds) {}
  Status SubmitJob(ServerContext* ctx, const v1::SubmitJobRequest* req, v1::Job* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Submit, &who); !a.ok()) return a;
    return s_.submit(who, *req, out);
  }
  Status GetJob(ServerContext* ctx, const v1::GetJobRequest* req, v1::Job* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Read, &who); !a.ok()) return a;
    return s_.get(req->id(), out);
  }
  Status ListJobs(ServerContext* ctx, const v1::ListJobsRequest* req, v1::ListJobsResponse* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Read, &who); !a.ok()) return a;
    s_.list(*req, out);
    return Status::OK;
  }
  Status WatchJob(ServerContext* ctx, const v1::WatchJobRequest* req, grpc::ServerWriter<v1::Job>* w) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Read, &who); !a.ok()) return a;
    return s_.watch(ctx, req->id(), w);
  }
  Status CancelJob(ServerContext* ctx, const v1::CancelJobRequest* req, v1::Job* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Submit, &who); !a.ok()) return a;
    return s_.cancel(who, req->id(), out);
  }
  Status SubmitSweep(ServerContext* ctx, const v1::SubmitSweepRequest* req, v1::JobArray* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Submit, &who); !a.ok()) return a;
    return s_.submitSweep(who, *req, out);
  }
  Status GetArray(ServerContext* ctx, const v1::GetArrayRequest* req, v1::JobArray* out) override {
    Caller who;
    if (Status a = clientAtLeast(creds_, ctx, Role::Read, &who); !a.ok()) return a;
    return s_.array(req->array_id(), out);
  }

 private:
  State& s_;
  const Credentials& creds_;
};

Status workerOnly(const Credentials& creds, ServerContext* ctx) {
  Caller who;
  if (Status a = creds.identify(ctx, &who); !a.ok()) return a;
  if (who.role != Role::Worker)
    return {StatusCode::PERMISSION_DENIED, "client '" + who.name + "' holds a client credential; the WorkerApi takes the worker token"};
  return Status::OK;
}

class WorkerService final : public v1::WorkerApi::Service {
 public:
  WorkerService(State& s, const Credentials& creds) : s_(s), creds_(creds) {}
  Status Register(ServerContext* ctx, const v1::RegisterRequest* req, v1::RegisterResponse* out) override {
    if (Status a = workerOnly(creds_, ctx); !a.ok()) return a;
    if (req->tp() < 1) return {StatusCode::INVALID_ARGUMENT, "tp must be at least 1"};
    s_.registerWorker(*req, out);
    return Status::OK;
  }
  Status Heartbeat(ServerContext* ctx, const v1::HeartbeatRequest* req, v1::HeartbeatResponse*) override {
    if (Status a = workerOnly(creds_, ctx); !a.ok()) return a;
    return s_.heartbeat(*req);
  }
  Status FetchJob(ServerContext* ctx, const v1::FetchJobRequest* req, v1::FetchJobResponse* out) override {
    if (Status a = workerOnly(creds_, ctx); !a.ok()) return a;
    return s_.fetch(ctx, *req, out);
  }
  Status ReportProgress(ServerContext* ctx, const v1::ProgressReport* req, v1::ProgressAck* out) override {
    if (Status a = workerOnly(creds_, ctx); !a.ok()) return a;
    out->set_cancel(s_.progress(*req));
    return Status::OK;
  }
  Status ReportResult(ServerContext* ctx, const v1::ResultReport* req, v1::ResultAck*) override {
    if (Status a = workerOnly(creds_, ctx); !a.ok()) return a;
    if (!isFinal(req->state()) && req->state() != v1::QUEUED)
      return {StatusCode::INVALID_ARGUMENT, "a result must be SUCCEEDED, FAILED, CANCELLED or QUEUED"};
    s_.result(*req);
    return Status::OK;
  }

 private:
  State& s_;
  const Credentials& creds_;
};

}  // namespace

int runCoordinator(const CoordinatorOptions& o) {
  if (!o.token_file.empty())
    throw Error("the coordinator takes no --token-file (one token for clients and workers alike let any client act as "
                "a worker): give --client-tokens FILE (lines: NAME TOKEN [read|submit|admin]) and --worker-token-file FILE");
  if (o.client_tokens.empty() || o.worker_token_file.empty())
    throw Error("--client-tokens and --worker-token-file are required: every call must carry a token of its role");
  if (o.data_root.empty() || !fs::is_directory(o.data_root))
    throw Error("--data-root '" + o.data_root + "' is not a folder");
  const Credentials credentials(o.client_tokens, o.worker_token_file);

  // SIGTERM / SIGINT are taken by a thread of our own (sigwait), not by a handler.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  JobStore store(o.db);
  State state(o, store);
  CoordinatorService clients(state, credentials);
  WorkerService workers(state, credentials);
  // The gRPC ecosystem's conventions: grpc.health.v1 (grpc_health_probe, load balancers) and
  // server reflection (grpcurl without the proto); neither needs a token.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(o.listen, serverCredentials(o.tls_cert, o.tls_key), &port);
  builder.RegisterService(&clients);
  builder.RegisterService(&workers);
  builder.SetMaxReceiveMessageSize(1 << 20);  // requests are small; larger ones are refused
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) throw Error("cannot listen on '" + o.listen + "'");
  std::fprintf(stderr, "coordinator: listening on %s (port %d), jobs in %s, %zu client credential(s)\n", o.listen.c_str(),
               port, o.db.c_str(), credentials.clients());

  std::unique_ptr<CoordinatorMetrics> metrics;
  if (!o.metrics_listen.empty()) {
    metrics = std::make_unique<CoordinatorMetrics>(o.metrics_listen);
    std::fprintf(stderr, "coordinator: metrics on %s (port %d)\n", o.metrics_listen.c_str(), metrics->port());
  }
  std::atomic<bool> done{false};
  std::thread monitor([&] {
    while (!done) {
      state.sweep();
      if (metrics) state.report(*metrics);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (done) return;
    // Drain: health turns NOT_SERVING so that probes and load balancers stop sending calls,
    // while calls still get answers; then the server stops.
    std::fprintf(stderr, "coordinator: signal %d, draining for %d ms, then shutting down\n", sig, o.drain_ms);
    server->GetHealthCheckService()->SetServingStatus(false);
    std::this_thread::sleep_for(std::chrono::milliseconds(std::max(0, o.drain_ms)));
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
