// `kvtp coordinator`: takes perplexity jobs from clients, keeps them in SQLite, hands them to
// registered worker groups, streams their progress, and survives its own restart and the loss
// of workers (docs/ARCHITECTURE.md, "Control plane").
#pragma once
#include <string>

namespace kvtp::launcher {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";
  std::string db = "kvtp-jobs.db";
  std::string client_tokens;       // lines `NAME TOKEN [read|submit|admin]` (grpc_common.h, Credentials)
  std::string worker_token_file;   // the workers' token
  std::string token_file;          // the old single shared token: refused with the way out
  std::string data_root;           // requests may only name files under this folder
  std::string tls_cert, tls_key;   // TLS when both are given
  int heartbeat_ms = 1000;         // what workers are told
  int worker_timeout_ms = 10000;   // a worker silent this long is lost
  int max_attempts = 2;            // a job whose worker is lost is re-queued until this many starts
  std::string metrics_listen;      // Prometheus text format at http://ADDR/metrics; empty: none
  int drain_ms = 1000;             // after SIGTERM: health NOT_SERVING this long, then shut down
};

// Serves until SIGTERM or SIGINT, then shuts down cleanly (in-flight calls get 5 s). Returns the
// process exit code.
int runCoordinator(const CoordinatorOptions& options);

}  // namespace kvtp::launcher
