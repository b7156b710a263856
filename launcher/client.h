// A client of the coordinator, as the client commands use it (submit, jobs, watch, cancel, and
// sweep's job arrays): its options, a stub with the client's token, following jobs to their end.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "launcher/grpc_common.h"
#include "launcher/sweep.h"

namespace kvtp::launcher {

struct ClientOptions {
  std::string coordinator = "127.0.0.1:50051";
  std::string token_file;
  std::string tls_ca;
  int timeout_s = 30;
};
// token_required: false where the command also runs without a coordinator (kvtp sweep).
void addClientOptions(CLI::App* cmd, ClientOptions& c, bool token_required = true);

struct Client {
  explicit Client(const ClientOptions& o);
  void check(const grpc::Status& st, const char* what) const;  // throws with the status's message
  std::unique_ptr<v1::Coordinator::Stub> stub;
  std::string token;
  std::chrono::milliseconds deadline;
};

// Follows a job to its end with a progress bar; prints the result. Returns the exit code.
int waitFor(Client& c, const std::string& id, bool json, bool quiet);

// Follows a job array until every job ended (a line on stderr as runs end unless quiet), then
// writes the sweep's PREFIX.csv and PREFIX.png from the jobs that succeeded, in run order.
// Returns the exit code: 1 if a run did not succeed (its row is missing; each one is named).
int writeArray(Client& c, const std::string& array_id, const std::string& prefix, bool quiet);

}  // namespace kvtp::launcher
