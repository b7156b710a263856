// The coordinator's `--metrics-listen` endpoint in the Prometheus text format: jobs by state,
// worker groups alive, tokens per second over the running jobs, and the latency of every job
// that ended (submit to end). The metrics and their text are prometheus-cpp's (core); the HTTP
// endpoint is a thread of ours: prometheus-cpp's exposer answers on civetweb's worker threads,
// which Debian builds with 100 KB stacks, and in this process OpenBLAS's static TLS (60 KB)
// takes most of each — its first scrape overflowed the stack in printf.
#pragma once
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>

namespace prometheus {
class Registry;
class Gauge;
class Histogram;
}  // namespace prometheus

namespace kvtp::launcher {

class CoordinatorMetrics {
 public:
  // Listens on host:port (port 0 picks one); throws if it cannot.
  explicit CoordinatorMetrics(const std::string& listen);
  ~CoordinatorMetrics();
  // The state now: jobs per state name, worker groups alive, the running jobs' tokens/s.
  void set(const std::map<std::string, int>& jobs_by_state, int worker_groups, double tokens_per_second);
  void jobEnded(double seconds);  // submit to SUCCEEDED, FAILED or CANCELLED
  int port() const { return port_; }

 private:
  void serve();  // answers GET /metrics with the registry's text, one connection at a time
  std::shared_ptr<prometheus::Registry> registry_;
  int listener_ = -1, port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread server_;
  std::map<std::string, prometheus::Gauge*> jobs_;
  prometheus::Gauge* workers_;
  prometheus::Gauge* tokens_per_second_;
  prometheus::Histogram* latency_;
};

}  // namespace kvtp::launcher
