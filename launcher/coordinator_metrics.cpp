#include "launcher/coordinator_metrics.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "runtime/error.h"

namespace kvtp::launcher {

CoordinatorMetrics::CoordinatorMetrics(const std::string& listen) : registry_(std::make_shared<prometheus::Registry>()) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos) throw Error("--metrics-listen '" + listen + "' is not host:port");
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_UNSPEC, hints.ai_socktype = SOCK_STREAM, hints.ai_flags = AI_PASSIVE;
  const std::string host = listen.substr(0, colon), port = listen.substr(colon + 1);
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found) != 0 || !found)
    throw Error("--metrics-listen '" + listen + "': cannot resolve it");
  listener_ = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int on = 1;
  setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  const bool bound = listener_ >= 0 && bind(listener_, found->ai_addr, found->ai_addrlen) == 0 && ::listen(listener_, 16) == 0;
  freeaddrinfo(found);
  if (!bound) {
    if (listener_ >= 0) close(listener_);
    throw Error("--metrics-listen '" + listen + "': cannot listen there");
  }
  sockaddr_storage at{};
  socklen_t len = sizeof at;
  getsockname(listener_, reinterpret_cast<sockaddr*>(&at), &len);
  port_ = ntohs(at.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&at)->sin6_port
                                         : reinterpret_cast<sockaddr_in*>(&at)->sin_port);
  auto& jobs = prometheus::BuildGauge().Name("kvtp_jobs").Help("Jobs by state").Register(*registry_);
  for (const char* state : {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"})
    jobs_[state] = &jobs.Add({{"state", state}});
  workers_ = &prometheus::BuildGauge()
                  .Name("kvtp_worker_groups")
                  .Help("Worker groups registered and heard from")
                  .Register(*registry_)
                  .Add({});
  tokens_per_second_ = &prometheus::BuildGauge()
                            .Name("kvtp_tokens_per_second")
                            .Help("Tokens scored per second, summed over the running jobs' last progress")
                            .Register(*registry_)
                            .Add({});
  // Jobs last from seconds (a small model) to hours (66B over a C4 shard).
  latency_ = &prometheus::BuildHistogram()
                  .Name("kvtp_job_seconds")
                  .Help("Time from submit to the end of each job that ended")
                  .Register(*registry_)
                  .Add({}, prometheus::Histogram::BucketBoundaries{1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600});
  server_ = std::thread([this] { serve(); });
}

CoordinatorMetrics::~CoordinatorMetrics() {
  stopping_ = true;
  server_.join();
  close(listener_);
}

void CoordinatorMetrics::serve() {
  while (!stopping_) {
    pollfd p{listener_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;  // wakes to see stopping_
    const int c = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    const timeval timeout{2, 0};  // a client that sends nothing does not hold the endpoint
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    std::string request;
    char buf[1024];
    for (ssize_t n; request.find("\r\n\r\n") == std::string::npos && request.size() < 8192 &&
                    (n = recv(c, buf, sizeof buf, 0)) > 0;)
      request.append(buf, size_t(n));
    const bool metrics = request.rfind("GET /metrics ", 0) == 0 || request.rfind("GET /metrics?", 0) == 0;
    const std::string body = metrics ? prometheus::TextSerializer().Serialize(registry_->Collect()) : "not found: GET /metrics\n";
    const std::string response = std::string(metrics ? "HTTP/1.1 200 OK" : "HTTP/1.1 404 Not Found") +
                                 "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: " +
                                 std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    for (size_t sent = 0; sent < response.size();) {
      const ssize_t n = send(c, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += size_t(n);
    }
    close(c);
  }
}

void CoordinatorMetrics::set(const std::map<std::string, int>& jobs_by_state, int worker_groups, double tokens_per_second) {
  for (auto& [state, gauge] : jobs_) {
    const auto it = jobs_by_state.find(state);
    gauge->Set(it == jobs_by_state.end() ? 0 : it->second);
  }
  workers_->Set(worker_groups);
  tokens_per_second_->Set(tokens_per_second);
}

void CoordinatorMetrics::jobEnded(double seconds) { latency_->Observe(seconds); }

}  // namespace kvtp::launcher
