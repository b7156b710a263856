#include "launcher/client.h"

#include <cmath>
#include <cstdio>
#include <iostream>
#include <thread>

#include "launcher/progress.h"
#include "runtime/error.h"

namespace kvtp::launcher {

using namespace std::chrono_literals;

void addClientOptions(CLI::App* cmd, ClientOptions& c, bool token_required) {
  cmd->add_option("--coordinator", c.coordinator, "coordinator address host:port");
  cmd->add_option("--token-file", c.token_file, "file holding this client's token (one of the coordinator's --client-tokens)")
      ->required(token_required);
  cmd->add_option("--tls-ca", c.tls_ca, "CA certificate: use TLS and trust this CA");
  cmd->add_option("--timeout", c.timeout_s, "deadline of each call, seconds (not of --wait)");
}

Client::Client(const ClientOptions& o)
    : stub(v1::Coordinator::NewStub(makeChannel(o.coordinator, o.tls_ca))), token(readToken(o.token_file)),
      deadline(std::chrono::seconds(o.timeout_s)) {}

void Client::check(const grpc::Status& st, const char* what) const {
  if (!st.ok())
    throw Error(std::string(what) + " failed: " + st.error_message() + " (gRPC code " + std::to_string(int(st.error_code())) +
                ")");
}

int waitFor(Client& c, const std::string& id, bool json, bool quiet) {
  ProgressBar bar(!quiet);
  v1::Job last;
  std::string streamed;  // a one-prompt generation job's text, printed as it arrives
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
      if (!json && p.texts_size() == 1 && p.texts(0).size() > streamed.size() && p.texts(0).starts_with(streamed)) {
        std::cout << p.texts(0).substr(streamed.size()) << std::flush;
        streamed = p.texts(0);
      }
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
    } else if (last.has_generate()) {
      const auto r = nlohmann::json::parse(last.result_json());
      const auto& seqs = r["sequences"];
      for (size_t i = 0; i < seqs.size(); ++i) {
        const std::string text = seqs[i]["text"];
        if (seqs.size() == 1 && text.starts_with(streamed)) std::cout << text.substr(streamed.size()) << "\n";
        else std::cout << (seqs.size() > 1 ? "--- " + std::to_string(i + 1) + " ---\n" : "") << text << "\n";
      }
      std::fprintf(stderr, "%s: %lld new tokens (%s, tp %d, %.2f s, %.1f tok/s)\n", last.id().c_str(),
                   (long long)r["new_tokens"].get<int64_t>(), last.worker().c_str(), r.value("tp", 1),
                   r["seconds"].get<double>(), r["tokens_per_second"].get<double>());
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


int writeArray(Client& c, const std::string& array_id, const std::string& prefix, bool quiet) {
  v1::JobArray array;
  for (int ended = -1;;) {
    v1::GetArrayRequest req;
    req.set_array_id(array_id);
    array.Clear();
    c.check(c.stub->GetArray(callContext(c.token, c.deadline).get(), req, &array), "GetArray");
    int now = 0, running = 0;
    for (const auto& j : array.jobs()) now += isFinal(j.state()), running += j.state() == v1::RUNNING;
    if (!quiet && now != ended)
      std::fprintf(stderr, "%s: %d of %d runs ended, %d running\n", array_id.c_str(), now, array.jobs_size(), running);
    ended = now;
    if (now == array.jobs_size()) break;
    std::this_thread::sleep_for(1s);
  }
  SweepFiles files(prefix);
  int missing = 0;
  for (const auto& j : array.jobs()) {
    if (j.state() == v1::SUCCEEDED) {
      files.add({j.label(), j.request().kv(), j.request().kv_quant()}, nlohmann::json::parse(j.result_json()));
      continue;
    }
    ++missing;
    std::fprintf(stderr, "kvtp: %s (%s) %s%s%s\n", j.id().c_str(), j.label().c_str(), stateName(j.state()),
                 j.error().empty() ? "" : ": ", j.error().c_str());
  }
  files.finish();
  return missing ? 1 : 0;
}

}  // namespace kvtp::launcher
