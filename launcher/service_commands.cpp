// kvtp coordinator | worker | submit ppl|generate|sweep | jobs | watch | cancel: the gRPC control plane.
#include <cstdio>
#include <iostream>

#include "launcher/client.h"
#include "launcher/commands.h"
#include "launcher/coordinator.h"
#include "launcher/generate_options.h"
#include "launcher/grpc_common.h"
#include "launcher/ppl_options.h"
#include "launcher/sweep.h"
#include "launcher/worker.h"
#include "runtime/error.h"

namespace kvtp::launcher {

namespace {

// Submits the job; prints its id, or with `wait` follows it to its end (exiting 1 unless it succeeded).
void submitJob(const ClientOptions& options, const v1::SubmitJobRequest& req, bool wait, bool json, bool quiet) {
  Client c(options);
  v1::Job job;
  c.check(c.stub->SubmitJob(callContext(c.token, c.deadline).get(), req, &job), "SubmitJob");
  if (!wait) {
    std::printf("%s\n", job.id().c_str());
    return;
  }
  if (!quiet) std::fprintf(stderr, "submitted %s\n", job.id().c_str());
  if (const int rc = waitFor(c, job.id(), json, quiet)) std::exit(rc);
}

}  // namespace

void addServiceCommands(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("coordinator", "Serve the job queue over gRPC");
    auto o = std::make_shared<CoordinatorOptions>();
    cmd->add_option("--listen", o->listen, "address to listen on (host:port; port 0 picks one)");
    cmd->add_option("--db", o->db, "SQLite job database (created if missing)");
    cmd->add_option("--client-tokens", o->client_tokens,
                    "clients' credentials: lines NAME TOKEN [read|submit|admin] (submit when omitted)");
    cmd->add_option("--worker-token-file", o->worker_token_file, "file holding the workers' token");
    cmd->add_option("--token-file", o->token_file)->group("");  // the old shared token: refused with the way out
    cmd->add_option("--data-root", o->data_root, "jobs may only read files under this folder")->required();
    cmd->add_option("--tls-cert", o->tls_cert, "TLS certificate (PEM)");
    cmd->add_option("--tls-key", o->tls_key, "TLS private key (PEM)");
    cmd->add_option("--worker-timeout-ms", o->worker_timeout_ms, "a worker silent this long is lost");
    cmd->add_option("--max-attempts", o->max_attempts, "starts of a job before a lost worker fails it");
    cmd->add_option("--metrics-listen", o->metrics_listen, "serve Prometheus metrics at http://ADDR/metrics (host:port)");
    cmd->add_option("--drain-ms", o->drain_ms, "after SIGTERM, health reports NOT_SERVING this long before the server stops");
    cmd->callback([o] {
      const int rc = runCoordinator(*o);
      if (rc) std::exit(rc);
    });
  }
  {
    auto* cmd = app.add_subcommand("worker", "Run jobs from a coordinator (launch with mpirun)");
    auto o = std::make_shared<WorkerOptions>();
    cmd->add_option("--coordinator", o->coordinator, "coordinator address host:port");
    cmd->add_option("--token-file", o->token_file, "file holding the workers' token")->required();
    cmd->add_option("--tls-ca", o->tls_ca, "CA certificate: use TLS and trust this CA");
    cmd->add_option("--tp", o->tp, "ranks per worker group (default: the whole launch)");
    cmd->callback([o] {
      const int rc = runWorker(*o);
      if (rc) std::exit(rc);
    });
  }
  auto* submit = app.add_subcommand("submit", "Submit a job or a sweep to a coordinator");
  submit->require_subcommand(1);
  {
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
      v1::SubmitJobRequest req;
      *req.mutable_ppl() = toRequest(a->ppl.resolve(), a->ppl.tp);
      submitJob(a->client, req, a->wait, a->json, a->quiet);
    });
  }
  {
    auto* cmd = submit->add_subcommand("generate", "a generation job (the options of kvtp generate)");
    struct Args {
      ClientOptions client;
      GenerateOptions gen;
      bool wait = false, json = false, quiet = false;
    };
    auto a = std::make_shared<Args>();
    addClientOptions(cmd, a->client);
    addGenerateOptions(cmd, a->gen);
    cmd->add_flag("--wait", a->wait, "follow the job to its end (a single prompt's text as it comes) and print the text");
    cmd->add_flag("--json", a->json, "with --wait: print the result as kvtp generate --json ends");
    cmd->add_flag("--quiet", a->quiet, "no progress");
    cmd->callback([a] {
      v1::SubmitJobRequest req;
      *req.mutable_generate() = toRequest(a->gen.job, a->gen.tp);
      submitJob(a->client, req, a->wait, a->json, a->quiet);
    });
  }
  {
    auto* cmd = submit->add_subcommand("sweep", "a sweep as a job array (the options of kvtp sweep)");
    struct Args {
      ClientOptions client;
      PplOptions ppl;
      SweepGrid grid;
      std::string out = "kv-sweep";
      bool wait = false, quiet = false;
    };
    auto a = std::make_shared<Args>();
    addClientOptions(cmd, a->client);
    addPplOptions(cmd, a->ppl);
    addSweepGridOptions(cmd, a->grid);
    cmd->add_flag("--wait", a->wait, "follow the array to its end and write PREFIX.csv and PREFIX.png");
    cmd->add_option("--out", a->out, "with --wait: output prefix");
    cmd->add_flag("--quiet", a->quiet, "no progress lines");
    cmd->callback([a] {
      Client c(a->client);
      PplJob base = a->ppl.resolve();
      base.mode = Mode::Decode;
      v1::SubmitSweepRequest req;
      *req.mutable_base() = toRequest(base, a->ppl.tp);
      for (const SweepRun& r : sweepRuns(a->grid, sweepContext(base, a->grid.caps))) {
        v1::SweepRun* run = req.add_runs();
        run->set_label(r.label), run->set_kv(r.kv), run->set_kv_quant(r.quant);
      }
      v1::JobArray array;
      c.check(c.stub->SubmitSweep(callContext(c.token, c.deadline).get(), req, &array), "SubmitSweep");
      if (!a->wait) {
        std::printf("%s\n", array.array_id().c_str());
        return;
      }
      if (!a->quiet) std::fprintf(stderr, "submitted %s: %d runs\n", array.array_id().c_str(), array.jobs_size());
      if (const int rc = writeArray(c, array.array_id(), a->out, a->quiet)) std::exit(rc);
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
          std::cout << nlohmann::json{{"id", j.id()},         {"state", stateName(j.state())}, {"ppl", j.ppl()},
                                      {"worker", j.worker()}, {"attempts", j.attempts()},        {"error", j.error()},
                                      {"owner", j.owner()},   {"array_id", j.array_id()},        {"label", j.label()},
                                      {"kind", j.has_generate() ? "generate" : "ppl"}}
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
