#include "launcher/grpc_common.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "runtime/error.h"

namespace kvtp::launcher {
namespace {
std::string readFile(const std::string& path, const char* what) {
  std::ifstream in(path);
  if (!in) throw Error(std::string("cannot read ") + what + " '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

std::string readToken(const std::string& path) {
  std::string t = readFile(path, "token file");
  const auto b = t.find_first_not_of(" \t\r\n"), e = t.find_last_not_of(" \t\r\n");
  if (b == std::string::npos) throw Error("token file '" + path + "' is empty");
  return t.substr(b, e - b + 1);
}

std::shared_ptr<grpc::ServerCredentials> serverCredentials(const std::string& cert_file, const std::string& key_file) {
  if (cert_file.empty() != key_file.empty()) throw Error("TLS needs both --tls-cert and --tls-key");
  if (cert_file.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions opts;
  opts.pem_key_cert_pairs.push_back({readFile(key_file, "TLS key"), readFile(cert_file, "TLS certificate")});
  return grpc::SslServerCredentials(opts);
}

std::shared_ptr<grpc::Channel> makeChannel(const std::string& address, const std::string& ca_file) {
  if (ca_file.empty()) return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = readFile(ca_file, "TLS CA certificate");
  return grpc::CreateChannel(address, grpc::SslCredentials(opts));
}

std::unique_ptr<grpc::ClientContext> callContext(const std::string& token, std::chrono::milliseconds deadline) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->AddMetadata("authorization", "Bearer " + token);
  ctx->set_deadline(std::chrono::system_clock::now() + deadline);
  return ctx;
}

Credentials::Credentials(const std::string& client_tokens_file, const std::string& worker_token_file) {
  const std::string worker = readToken(worker_token_file);
  if (worker.size() < 16) throw Error("the worker token in '" + worker_token_file + "' is shorter than 16 characters");
  std::istringstream lines(readFile(client_tokens_file, "client tokens file"));
  std::string line;
  for (int n = 1; std::getline(lines, line); ++n) {
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string name, token, role, extra;
    if (!(words >> name)) continue;
    const std::string where = "'" + client_tokens_file + "' line " + std::to_string(n);
    if (!(words >> token) || (words >> role && words >> extra))
      throw Error(where + ": expected NAME TOKEN [read|submit|admin]");
    const std::map<std::string, Role> roles = {{"", Role::Submit}, {"read", Role::Read}, {"submit", Role::Submit},
                                               {"admin", Role::Admin}};
    if (!roles.count(role)) throw Error(where + ": role '" + role + "' is not read, submit or admin");
    if (token.size() < 16) throw Error(where + ": the token of '" + name + "' is shorter than 16 characters");
    if (token == worker) throw Error(where + ": '" + name + "' holds the workers' token; a client needs its own");
    for (auto& [t, c] : tokens_)
      if (c.name == name || t == "Bearer " + token)
        throw Error(where + ": '" + name + "' repeats the " + (c.name == name ? "name" : "token") + " of an earlier line");
    tokens_.push_back({"Bearer " + token, {name, roles.at(role)}});
  }
  if (tokens_.empty()) throw Error("'" + client_tokens_file + "' names no client (lines: NAME TOKEN [read|submit|admin])");
  tokens_.push_back({"Bearer " + worker, {"worker", Role::Worker}});
}

grpc::Status Credentials::identify(const grpc::ServerContext* ctx, Caller* out) const {
  const auto& md = ctx->client_metadata();
  const auto it = md.find("authorization");
  const std::string_view given = it == md.end() ? std::string_view() : std::string_view(it->second.data(), it->second.size());
  const Caller* found = nullptr;
  for (auto& [want, who] : tokens_) {  // every token of that length compared to its end: no early exit
    if (given.size() != want.size()) continue;
    unsigned diff = 0;
    for (size_t i = 0; i < want.size(); ++i) diff |= unsigned(given[i] ^ want[i]);
    if (diff == 0) found = &who;
  }
  if (!found) return {grpc::StatusCode::UNAUTHENTICATED, "missing or unknown bearer token (authorization metadata)"};
  *out = *found;
  return grpc::Status::OK;
}

v1::PplRequest toRequest(const PplJob& j, int tp) {
  v1::PplRequest r;
  r.set_model(j.model_dir);
  r.set_synthetic(j.synthetic);
  r.set_seed(j.seed);
  r.set_layers(j.layers);
  r.set_data(j.data);
  r.set_input_ids(j.input_ids);
  r.set_seq_len(j.seq_len);
  r.set_stride(j.stride);
  r.set_max_windows(j.max_windows);
  r.set_max_docs(int32_t(j.max_docs));
  r.set_join(j.join);
  r.set_drop_partial(j.drop_partial);
  r.set_mode(modeName(j.mode));
  r.set_tp(tp);
  r.set_kv(j.kv);
  r.set_kv_quant(j.kv_quant);
  r.set_prefill(j.prefill);
  r.set_kv_lowrank(j.kv_lowrank);
  r.set_device(j.device);
  r.set_dtype(j.dtype);
  r.set_time_collectives(j.time_collectives);
  r.set_batch(j.batch);
  return r;
}

PplJob fromRequest(const v1::PplRequest& r) {
  PplJob j;
  applyPreset(j, r.preset().empty() ? "default" : r.preset());
  j.model_dir = r.model();
  j.synthetic = r.synthetic();
  j.seed = r.seed();
  j.layers = r.layers();
  j.data = r.data();
  j.input_ids = r.input_ids();
  if (r.seq_len()) j.seq_len = r.seq_len();
  if (r.stride()) j.stride = r.stride();
  if (r.max_windows()) j.max_windows = r.max_windows();
  if (r.max_docs()) j.max_docs = size_t(r.max_docs());
  if (r.has_join()) j.join = r.join();
  if (r.drop_partial()) j.drop_partial = true;
  j.mode = parseMode(r.mode().empty() ? "prefill" : r.mode());
  j.kv = r.kv();
  j.kv_quant = r.kv_quant();
  j.prefill = r.prefill();
  j.kv_lowrank = r.kv_lowrank();
  if (!r.device().empty()) j.device = r.device();
  j.dtype = r.dtype();
  j.time_collectives = r.time_collectives();
  if (r.batch()) j.batch = r.batch();
  return j;
}

v1::GenerateRequest toRequest(const GenerateJob& j, int tp) {
  v1::GenerateRequest r;
  r.set_model(j.model_dir);
  r.set_synthetic(j.synthetic);
  r.set_weights_seed(j.seed);
  r.set_layers(j.layers);
  for (const auto& p : j.prompts) r.add_prompts(p);
  r.set_prompts_file(j.prompts_file);
  r.set_input_ids(j.input_ids);
  r.set_max_new_tokens(j.max_new_tokens);
  r.set_temperature(j.sampling.temperature);
  r.set_top_k(j.sampling.top_k);
  r.set_top_p(j.sampling.top_p);
  r.set_seed(j.sampling.seed);
  for (const auto& s : j.stop) r.add_stop(s);
  r.set_ignore_eos(j.ignore_eos);
  r.set_kv(j.kv);
  r.set_kv_quant(j.kv_quant);
  r.set_kv_lowrank(j.kv_lowrank);
  r.set_batch(j.batch);
  r.set_device(j.device);
  r.set_dtype(j.dtype);
  r.set_tp(tp);
  return r;
}

GenerateJob fromRequest(const v1::GenerateRequest& r) {
  GenerateJob j;
  j.model_dir = r.model();
  j.synthetic = r.synthetic();
  j.seed = r.weights_seed();
  j.layers = r.layers();
  j.prompts.assign(r.prompts().begin(), r.prompts().end());
  j.prompts_file = r.prompts_file();
  j.input_ids = r.input_ids();
  if (r.max_new_tokens()) j.max_new_tokens = r.max_new_tokens();
  j.sampling.temperature = r.temperature();
  j.sampling.top_k = r.top_k();
  if (r.top_p()) j.sampling.top_p = r.top_p();
  j.sampling.seed = r.seed();
  j.stop.assign(r.stop().begin(), r.stop().end());
  j.ignore_eos = r.ignore_eos();
  j.kv = r.kv();
  j.kv_quant = r.kv_quant();
  j.kv_lowrank = r.kv_lowrank();
  if (r.batch()) j.batch = r.batch();
  if (!r.device().empty()) j.device = r.device();
  j.dtype = r.dtype();
  return j;
}

const char* stateName(v1::JobState s) {
  switch (s) {
    case v1::QUEUED: return "QUEUED";
    case v1::RUNNING: return "RUNNING";
    case v1::SUCCEEDED: return "SUCCEEDED";
    case v1::FAILED: return "FAILED";
    case v1::CANCELLED: return "CANCELLED";
    default: return "UNSPECIFIED";
  }
}

bool isFinal(v1::JobState s) { return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED; }

}  // namespace kvtp::launcher
