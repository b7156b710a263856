// What the coordinator, the workers and the client commands share: credentials (a bearer token,
// optional TLS), channels with deadlines, and the PplRequest <-> PplJob mapping.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "proto/kvtp.grpc.pb.h"
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

// Server side: OK if the call carries the token, UNAUTHENTICATED otherwise.
grpc::Status checkToken(const grpc::ServerContext* ctx, const std::string& token);

v1::PplRequest toRequest(const PplJob& job, int tp);
PplJob fromRequest(const v1::PplRequest& req);  // preset first, then the fields that are set
const char* stateName(v1::JobState s);
bool isFinal(v1::JobState s);

}  // namespace kvtp::launcher
