// kvtp coordinator | worker | submit ppl | jobs | watch | cancel: the gRPC control plane.
#include <cstdio>
#include <iostream>
#include <thread>

#include "launcher/commands.h"
#include "launcher/coordinator.h"
#include "launcher/grpc_common.h"
#include "launcher/ppl_options.h"
#include "launcher/progress.h"
#include "launcher/worker.h"
#include "runtime/error.h"

namespace kvtp::launcher {
namespace {

using namespace std::chrono_literals;

struct ClientOptions {
  std::string coordinator = "127.0.0.1:50051";
  std::string token_file;
  std::string tls_ca;
  int timeout_s = 30;
};

void addClientOptions(CLI::App* cmd, ClientOptions& c) {
  cmd->add_option("--coordinator", c.coordinator, "coordinator address host:port");
  cmd->add_option("--token-file", c.token_file, "file holding the shared bearer token")->required();
  cmd->add_option("--tls-ca", c.tls_ca, "CA certificate: use TLS and trust this CA");
  cmd->add_option("--timeout", c.timeout_s, "deadline of each call, seconds (not of --wait)");
}

struct Client {
  explicit Client(const ClientOptions& o)
      : stub(v1::Coordinator::NewStub(makeChannel(o.coordinator, o.tls_ca))), token(readToken(o.token_file)),
        deadline(std::chrono::seconds(o.timeout_s)) {}
  void check(const grpc::Status& st, const char* what) const {
    if (!st.ok())
      throw Error(std::string(what) + " failed: " + st.error_message() + " (gRPC code " +
                  std::to_string(int(st.error_code())) + ")");
  }
  std::unique_ptr<v1::Coordinator::Stub> stub;
  std::string token;
  std::chrono::milliseconds deadline;
};

// Follows a job to its end with a progress bar; prints the result. Returns the exit code.
int waitFor(Client& c, const std::string& id, bool json, bool quiet) {
  ProgressBar bar(!quiet);
  v1::Job last;
  for (int reconnects = 0; !isFinal(last.state()); ++reconnects) {
    auto ctx = callContext(c.token, std::chrono::hours(24 * 365));
    v1::WatchJobRequest req;
    req.set_id(id);
    auto reader = c.stub->WatchJob(ctx.get(), req);
    v1::Job j;
    while (reader->Read(&j)) {
      last = j;
      const auto& p = j.progress();
      Progress pr;
      pr.windows_done = p.windows_done();
      pr.windows_total = p.windows_total();
      pr.tokens_done = p.tokens_done();
      pr.tokens_total = p.tokens_total();
      pr.nll = p.tokens_done() ? std::log(std::max(p.running_ppl(), 1e-300)) * double(p.tokens_done()) : 0;
      pr.seconds = p.seconds();
      if (j.state() == v1::RUNNING && p.windows_total()) bar.update(pr);
    }
    const auto st = reader->Finish();
    if (isFinal(last.state())) break;
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE || reconnects >= 60) c.check(st, "WatchJob");
    std::this_thread::sleep_for(1s);  // the coordinator is restarting: watch again
  }
  bar.finish();
  if (last.state() == v1::SUCCEEDED) {
    if (json) {
      std::cout << last.result_json() << std::endl;
    } else {
      const auto r = nlohmann::json::parse(last.result_json());
      std::printf("%s: ppl %.4f  over %lld tokens  (%s, tp %d, %.1f s, %.0f tok/s)\n", last.id().c_str(),
                  r["ppl"].get<double>(), (long long)r["tokens"].get<int64_t>(), last.worker().c_str(),
                  r.value("tp", 1), r["seconds"].get<double>(), r["tokens_per_second"].get<double>());
    }
    return 0;
  }
  std::fprintf(stderr, "kvtp: job %s %s%s%s\n", last.id().c_str(), stateName(last.state()),
               last.error().empty() ? "" : ": ", last.error().c_str());
  return 1;
}

}  // namespace

void addServiceCommands(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("coordinator", "Serve the job queue over gRPC");
    auto o = std::make_shared<CoordinatorOptions>();
    cmd->add_option("--listen", o->listen, "address to listen on (host:port; port 0 picks one)");
    cmd->add_option("--db", o->db, "SQLite job database (created if missing)");
    cmd->add_option("--token-file", o->token_file, "file holding the shared bearer token")->required();
    cmd->add_option("--data-root", o->data_root, "jobs may only read files under this folder")->required();
    cmd->add_option("--tls-cert", o->tls_cert, "TLS certificate (PEM)");
    cmd->add_option("--tls-key", o->tls_key, "TLS private key (PEM)");
    cmd->add_option("--worker-timeout-ms", o->worker_timeout_ms, "a worker silent this long is lost");
    cmd->add_option("--max-attempts", o->max_attempts, "starts of a job before a lost worker fails it");
    cmd->callback([o] {
      const int rc = runCoordinator(*o);
      if (rc) std::exit(rc);
    });
  }
  {
    auto* cmd = app.add_subcommand("worker", "Run jobs from a coordinator (launch with mpirun)");
    auto o = std::make_shared<WorkerOptions>();
    cmd->add_option("--coordinator", o->coordinator, "coordinator address host:port");
    cmd->add_option("--token-file", o->token_file, "file holding the shared bearer token")->required();
    cmd->add_option("--tls-ca", o->tls_ca, "CA certificate: use TLS and trust this CA");
    cmd->add_option("--tp", o->tp, "ranks per worker group (default: the whole launch)");
    cmd->callback([o] {
      const int rc = runWorker(*o);
      if (rc) std::exit(rc);
    });
  }
  {
    auto* submit = app.add_subcommand("submit", "Submit a job to a coordinator");
    submit->require_subcommand(1);
    auto* cmd = submit->add_subcommand("ppl", "a perplexity job (the options of kvtp ppl)");
    struct Args {
      ClientOptions client;
      PplOptions ppl;
      bool wait = false, json = false, quiet = false;
    };
    auto a = std::make_shared<Args>();
    addClientOptions(cmd, a->client);
    addPplOptions(cmd, a->ppl);
    cmd->add_flag("--wait", a->wait, "follow the job to its end and print the result");
    cmd->add_flag("--json", a->json, "with --wait: print the result as kvtp ppl --json does");
    cmd->add_flag("--quiet", a->quiet, "no progress bar");
    cmd->callback([a] {
      Client c(a->client);
      v1::SubmitJobRequest req;
      *req.mutable_ppl() = toRequest(a->ppl.resolve(), a->ppl.tp);
      v1::Job job;
      c.check(c.stub->SubmitJob(callContext(c.token, c.deadline).get(), req, &job), "SubmitJob");
      if (!a->wait) {
        std::printf("%s\n", job.id().c_str());
        return;
      }
      if (!a->quiet) std::fprintf(stderr, "submitted %s\n", job.id().c_str());
      if (const int rc = waitFor(c, job.id(), a->json, a->quiet)) std::exit(rc);
    });
  }
  {
    auto* cmd = app.add_subcommand("jobs", "List jobs, newest first");
    auto o = std::make_shared<ClientOptions>();
    auto json = std::make_shared<bool>(false);
    addClientOptions(cmd, *o);
    cmd->add_flag("--json", *json, "one JSON object per line");
    cmd->callback([o, json] {
      Client c(*o);
      v1::ListJobsRequest req;
      v1::ListJobsResponse resp;
      c.check(c.stub->ListJobs(callContext(c.token, c.deadline).get(), req, &resp), "ListJobs");
      for (const auto& j : resp.jobs()) {
        if (*json) {
          std::cout << nlohmann::json{{"id", j.id()}, {"state", stateName(j.state())}, {"ppl", j.ppl()},
                                      {"worker", j.worker()}, {"attempts", j.attempts()}, {"error", j.error()}}
                           .dump()
                    << "\n";
        } else {
          std::printf("%-10s %-10s %10.4f  %-24s %s\n", j.id().c_str(), stateName(j.state()), j.ppl(),
                      j.worker().c_str(), j.error().c_str());
        }
      }
    });
  }
  {
    auto* cmd = app.add_subcommand("watch", "Follow a job to its end");
    struct Args {
      ClientOptions client;
      std::string id;
      bool json = false, quiet = false;
    };
    auto a = std::make_shared<Args>();
    addClientOptions(cmd, a->client);
    cmd->add_option("id", a->id, "job id")->required();
    cmd->add_flag("--json", a->json, "print the result as kvtp ppl --json does");
    cmd->add_flag("--quiet", a->quiet, "no progress bar");
    cmd->callback([a] {
      Client c(a->client);
      if (const int rc = waitFor(c, a->id, a->json, a->quiet)) std::exit(rc);
    });
  }
  {
    auto* cmd = app.add_subcommand("cancel", "Cancel a job");
    auto o = std::make_shared<ClientOptions>();
    auto id = std::make_shared<std::string>();
    addClientOptions(cmd, *o);
    cmd->add_option("id", *id, "job id")->required();
    cmd->callback([o, id] {
      Client c(*o);
      v1::CancelJobRequest req;
      req.set_id(*id);
      v1::Job j;
      c.check(c.stub->CancelJob(callContext(c.token, c.deadline).get(), req, &j), "CancelJob");
      std::printf("%s %s\n", j.id().c_str(), j.state() == v1::CANCELLED ? "CANCELLED" : "cancel requested");
    });
  }
}

}  // namespace kvtp::launcher
