// `mpirun -np N kvtp worker`: each tensor-parallel group of the launch is one worker. Its rank 0
// registers with the coordinator, heartbeats, fetches jobs and reports progress and results;
// it broadcasts each job to the group's other ranks, and all ranks run it.
#pragma once
#include <string>

namespace kvtp::launcher {

struct WorkerOptions {
  std::string coordinator = "127.0.0.1:50051";
  std::string token_file;
  std::string tls_ca;  // TLS with this CA certificate when given
  int tp = 0;          // ranks per group; 0 = the whole launch is one group
};

// Serves jobs until SIGTERM/SIGINT (a running job is handed back to the queue). Returns the
// process exit code.
int runWorker(const WorkerOptions& options);

}  // namespace kvtp::launcher
