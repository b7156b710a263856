// What the coordinator, the workers and the client commands share: credentials (a bearer token,
// optional TLS), channels with deadlines, and the PplRequest <-> PplJob mapping.
#pragma once
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "proto/kvtp.grpc.pb.h"
#include "runtime/generate_job.h"
#include "runtime/ppl_job.h"

namespace kvtp::launcher {

namespace v1 = ::kvtp::v1;

// The shared secret from a token file (surrounding whitespace ignored); a clear error if the
// file is missing or empty.
std::string readToken(const std::string& path);

// TLS when cert and key (server) or a CA file (client) are given, plaintext otherwise.
std::shared_ptr<grpc::ServerCredentials> serverCredentials(const std::string& cert_file, const std::string& key_file);
std::shared_ptr<grpc::Channel> makeChannel(const std::string& address, const std::string& ca_file);

// A client context carrying `authorization: Bearer <token>` and a deadline.
std::unique_ptr<grpc::ClientContext> callContext(const std::string& token, std::chrono::milliseconds deadline);

// Who may call what (proto/kvtp.proto, "Roles"): clients read, submit (and cancel their own
// jobs) or administer; workers use the WorkerApi only.
enum class Role { Read, Submit, Admin, Worker };
struct Caller {
  std::string name;
  Role role;
};

// The coordinator's tokens: the clients' from a file of lines `NAME TOKEN [read|submit|admin]`
// (role submit when omitted; blank lines and lines from '#' on ignored) and the workers' one
// token from a file of its own. Clear errors for a malformed line, a token shorter than 16
// characters, a name or token given twice, or a client token equal to the workers'.
class Credentials {
 public:
  Credentials(const std::string& client_tokens_file, const std::string& worker_token_file);
  // The caller behind the call's bearer token (compared in constant time against every known
  // token), or UNAUTHENTICATED.
  grpc::Status identify(const grpc::ServerContext* ctx, Caller* out) const;
  size_t clients() const { return tokens_.size() - 1; }

 private:
  std::vector<std::pair<std::string, Caller>> tokens_;  // "Bearer <token>", who holds it
};

v1::PplRequest toRequest(const PplJob& job, int tp);
PplJob fromRequest(const v1::PplRequest& req);  // preset first, then the fields that are set
v1::GenerateRequest toRequest(const GenerateJob& job, int tp);
GenerateJob fromRequest(const v1::GenerateRequest& req);  // defaults where a field is 0 / empty
const char* stateName(v1::JobState s);
bool isFinal(v1::JobState s);

}  // namespace kvtp::launcher
