#include "client/agent_memory_client.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace kvmem {

AgentMemoryClient::AgentMemoryClient(const ClientOptions& options)
    : AgentMemoryClient(grpc::CreateChannel(options.address, grpc::InsecureChannelCredentials()),
                        options) {}

AgentMemoryClient::AgentMemoryClient(std::shared_ptr<grpc::Channel> channel,
                                     const ClientOptions& options)
    : options_(options),
      channel_(std::move(channel)),
      stub_(v1::AgentMemory::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void AgentMemoryClient::Prepare(grpc::ClientContext* context) const {
  if (!options_.token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
  }
  if (options_.timeout_ms > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(options_.timeout_ms));
  }
}

absl::StatusOr<v1::Session> AgentMemoryClient::CreateSession(
    const v1::CreateSessionRequest& request) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::Session response;
  grpc::Status status = stub_->CreateSession(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::AppendTurnResponse> AgentMemoryClient::AppendTurn(
    const v1::AppendTurnRequest& request) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::AppendTurnResponse response;
  grpc::Status status = stub_->AppendTurn(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::AppendTurnResponse> AgentMemoryClient::AppendTurn(const std::string& session_id,
                                                                     v1::Role role,
                                                                     const std::string& content) {
  v1::AppendTurnRequest request;
  request.set_session_id(session_id);
  request.set_role(role);
  request.set_content(content);
  return AppendTurn(request);
}

absl::StatusOr<v1::GenerateUsage> AgentMemoryClient::Generate(const v1::GenerateRequest& request,
                                                              const TextDeltaCallback& on_text) {
  grpc::ClientContext context;
  Prepare(&context);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub_->Generate(&context, request);
  v1::GenerateResponse response;
  v1::GenerateUsage usage;
  bool have_usage = false, cancelled = false;
  while (reader->Read(&response)) {
    if (cancelled) continue;  // drain what was already in flight
    if (!response.text().empty() && on_text && !on_text(response.text())) {
      context.TryCancel();
      cancelled = true;
      continue;
    }
    if (response.has_usage()) {
      usage = std::move(*response.mutable_usage());
      have_usage = true;
    }
  }
  grpc::Status status = reader->Finish();
  if (cancelled) {
    return absl::CancelledError("generation cancelled by the caller's callback");
  }
  if (!status.ok()) return FromGrpcStatus(status);
  if (!have_usage) {
    return absl::InternalError("the server ended Generate without its final usage message");
  }
  return usage;
}

absl::StatusOr<v1::Session> AgentMemoryClient::GetSession(const std::string& session_id) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  v1::Session response;
  grpc::Status status = stub_->GetSession(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ListSessionsResponse> AgentMemoryClient::ListSessions(
    const v1::ListSessionsRequest& request) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListSessionsResponse response;
  grpc::Status status = stub_->ListSessions(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<std::vector<v1::Session>> AgentMemoryClient::ListAllSessions(
    const std::map<std::string, std::string>& label_filter) {
  std::vector<v1::Session> sessions;
  v1::ListSessionsRequest request;
  request.mutable_label_filter()->insert(label_filter.begin(), label_filter.end());
  do {
    absl::StatusOr<v1::ListSessionsResponse> page = ListSessions(request);
    if (!page.ok()) return page.status();
    for (v1::Session& s : *page->mutable_sessions()) sessions.push_back(std::move(s));
    request.set_page_token(page->next_page_token());
  } while (!request.page_token().empty());
  return sessions;
}

absl::StatusOr<v1::Session> AgentMemoryClient::ForkSession(const std::string& session_id,
                                                           const std::string& new_session_id) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ForkSessionRequest request;
  request.set_session_id(session_id);
  request.set_new_session_id(new_session_id);
  v1::Session response;
  grpc::Status status = stub_->ForkSession(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status AgentMemoryClient::DeleteSession(const std::string& session_id) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::DeleteSessionRequest request;
  request.set_session_id(session_id);
  v1::DeleteSessionResponse response;
  return FromGrpcStatus(stub_->DeleteSession(&context, request, &response));
}

absl::Status AgentMemoryClient::CheckHealth() {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(
        absl::StrCat("the server reports ",
                     grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())));
  }
  return absl::OkStatus();
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<v1::Role> RoleFromName(std::string_view name) {
  if (name == "system") return v1::ROLE_SYSTEM;
  if (name == "user") return v1::ROLE_USER;
  if (name == "assistant") return v1::ROLE_ASSISTANT;
  if (name == "tool") return v1::ROLE_TOOL;
  return absl::InvalidArgumentError(absl::StrCat("unknown role \"", std::string(name),
                                                 "\": use system, user, assistant or tool"));
}

absl::StatusOr<v1::Pooling> PoolingFromName(std::string_view name) {
  if (name == "max") return v1::POOLING_MAX;
  if (name == "avg") return v1::POOLING_AVG;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown pooling \"", std::string(name), "\": use max or avg"));
}

std::string RoleName(v1::Role role) {
  switch (role) {
    case v1::ROLE_SYSTEM:
      return "system";
    case v1::ROLE_USER:
      return "user";
    case v1::ROLE_ASSISTANT:
      return "assistant";
    case v1::ROLE_TOOL:
      return "tool";
    default:
      return "unspecified";
  }
}

std::string PoolingName(v1::Pooling pooling) {
  switch (pooling) {
    case v1::POOLING_MAX:
      return "max";
    case v1::POOLING_AVG:
      return "avg";
    default:
      return "unspecified";
  }
}

std::string FinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP:
      return "stop";
    default:
      return "unspecified";
  }
}

}  // namespace kvmem
