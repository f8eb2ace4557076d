#include "service/session_proto.h"

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

// Limits on what a request may carry besides turn content (which the SessionManager bounds).
constexpr int kMaxLabels = 64;
constexpr size_t kMaxLabelKeyBytes = 128;
constexpr size_t kMaxLabelValueBytes = 1024;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopBytes = 256;

absl::Status ValidateLabels(const google::protobuf::Map<std::string, std::string>& labels,
                            const char* field) {
  if (labels.size() > kMaxLabels) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has ", labels.size(), " entries; at most ", kMaxLabels));
  }
  for (const auto& [key, value] : labels) {
    if (key.empty() || key.size() > kMaxLabelKeyBytes || value.size() > kMaxLabelValueBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " keys must be 1-", kMaxLabelKeyBytes, " bytes and values at most ",
                       kMaxLabelValueBytes, " bytes; \"", key.substr(0, 32), "\" is not"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Role> RoleFromProto(v1::Role role) {
  switch (role) {
    case v1::ROLE_SYSTEM:
      return Role::kSystem;
    case v1::ROLE_USER:
      return Role::kUser;
    case v1::ROLE_ASSISTANT:
      return Role::kAssistant;
    case v1::ROLE_TOOL:
      return Role::kTool;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("role ", static_cast<int>(role),
                       " is not one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL"));
  }
}

v1::Pooling PoolingToProto(Pooling pooling) {
  return pooling == Pooling::kAvg ? v1::POOLING_AVG : v1::POOLING_MAX;
}

v1::FinishReason FinishReasonToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kCancelled:
      break;  // never answered: the call ends CANCELLED
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

}  // namespace

absl::Status RequireSessionId(const std::string& session_id) {
  if (session_id.empty()) {
    return absl::InvalidArgumentError("session_id is empty; name the session to act on");
  }
  return absl::OkStatus();
}

absl::StatusOr<CreateSessionRequest> CreateSessionFromProto(const v1::CreateSessionRequest& proto,
                                                            const Caller& caller) {
  KVMEM_RETURN_IF_ERROR(ValidateLabels(proto.labels(), "labels"));
  CreateSessionRequest request;
  request.tenant = caller.tenant;
  request.session_id = proto.session_id();
  request.labels.insert(proto.labels().begin(), proto.labels().end());
  const v1::MemoryPolicy& m = proto.memory();
  SessionOverrides& o = request.overrides;
  if (m.has_policy()) o.policy = m.policy();
  if (m.has_hot_budget()) o.budget = m.hot_budget();
  if (m.has_window()) o.window = m.window();
  if (m.has_kernel()) o.kernel = m.kernel();
  if (m.has_recall_blocks()) {
    if (m.recall_blocks() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "memory.recall_blocks must be >= 0 (0 = no recall), got ", m.recall_blocks()));
    }
    o.recall_blocks = m.recall_blocks();
  }
  switch (m.pooling()) {
    case v1::POOLING_UNSPECIFIED:
      break;
    case v1::POOLING_MAX:
      o.pooling = Pooling::kMax;
      break;
    case v1::POOLING_AVG:
      o.pooling = Pooling::kAvg;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "memory.pooling ", static_cast<int>(m.pooling()), " is not POOLING_MAX or POOLING_AVG"));
  }
  if (!proto.chat_template().empty()) o.chat_template = proto.chat_template();
  return request;
}

absl::StatusOr<AppendTurnRequest> AppendTurnFromProto(const v1::AppendTurnRequest& proto,
                                                      const Caller& caller) {
  KVMEM_RETURN_IF_ERROR(RequireSessionId(proto.session_id()));
  AppendTurnRequest request;
  KVMEM_ASSIGN_OR_RETURN(request.role, RoleFromProto(proto.role()));
  request.tenant = caller.tenant;
  request.session_id = proto.session_id();
  request.content = proto.content();
  if (proto.has_expected_turns()) request.expected_turns = proto.expected_turns();
  request.request_id = proto.request_id();
  return request;
}

absl::StatusOr<GenerateRequest> GenerateFromProto(const v1::GenerateRequest& proto,
                                                  const Caller& caller) {
  KVMEM_RETURN_IF_ERROR(RequireSessionId(proto.session_id()));
  if (proto.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop has ", proto.stop_size(), " strings; at most ", kMaxStopStrings));
  }
  GenerateRequest request;
  request.tenant = caller.tenant;
  request.session_id = proto.session_id();
  SamplingParams& s = request.options.sampling;
  if (proto.max_tokens() != 0) s.max_tokens = proto.max_tokens();
  s.temperature = proto.temperature();
  if (proto.top_p() != 0) s.top_p = proto.top_p();
  s.top_k = proto.top_k();
  s.seed = proto.seed();
  s.ignore_eos = proto.ignore_eos();
  for (const std::string& stop : proto.stop()) {
    if (stop.size() > kMaxStopBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop strings must be at most ", kMaxStopBytes, " bytes"));
    }
    s.stop.push_back(stop);
  }
  KVMEM_RETURN_IF_ERROR(ValidateSamplingParams(s));
  request.options.keep = !proto.discard();
  if (proto.has_expected_turns()) request.expected_turns = proto.expected_turns();
  request.request_id = proto.request_id();
  return request;
}

absl::StatusOr<ListSessionsRequest> ListSessionsFromProto(const v1::ListSessionsRequest& proto,
                                                          const Caller& caller) {
  if (proto.page_size() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be >= 0 (0 = 100), got ", proto.page_size()));
  }
  KVMEM_RETURN_IF_ERROR(ValidateLabels(proto.label_filter(), "label_filter"));
  ListSessionsRequest request;
  request.tenant = caller.tenant;
  if (proto.page_size() > 0) request.page_size = proto.page_size();
  request.page_token = proto.page_token();
  request.label_filter.insert(proto.label_filter().begin(), proto.label_filter().end());
  return request;
}

void SessionToProto(const SessionInfo& info, const ModelConfig& config, v1::Session* proto) {
  proto->set_session_id(info.session_id);
  proto->mutable_labels()->insert(info.labels.begin(), info.labels.end());
  const SessionOptions& o = info.options;
  v1::MemoryPolicy* m = proto->mutable_memory();
  m->set_policy(o.memory.policy);
  m->set_hot_budget(o.memory.budget);
  m->set_window(o.memory.window);
  m->set_kernel(o.memory.kernel);
  m->set_pooling(PoolingToProto(o.memory.pooling));
  m->set_recall_blocks(o.recall_blocks);
  proto->set_chat_template(o.chat_template);
  proto->set_block_size(o.block_size);
  proto->set_created_unix_ms(info.created_unix_ms);
  proto->set_updated_unix_ms(info.updated_unix_ms);
  const SessionStats& s = info.stats;
  proto->set_total_tokens(s.total_tokens);
  proto->set_turns(s.turns);
  proto->set_hot_tokens(s.hot_tokens);
  proto->set_num_layers(config.num_layers);
  proto->set_num_kv_heads(config.num_kv_heads);
  proto->mutable_hot_tokens_per_head()->Add(s.hot_tokens_per_head.begin(),
                                            s.hot_tokens_per_head.end());
  proto->set_hot_bytes(s.hot_bytes);
  proto->set_warm_blocks(info.warm_blocks);
  proto->set_warm_bytes(info.warm_bytes);
  proto->set_cold_blocks(info.cold_blocks);
  proto->set_cold_bytes(info.cold_bytes);
  proto->set_resident(info.resident);
  proto->set_model_fingerprint(info.model_fingerprint);
  proto->set_recalled_blocks(s.recalled_blocks);
}

void AppendResultToProto(const AppendResult& result, v1::AppendTurnResponse* proto) {
  proto->set_turn_index(result.turn_index);
  proto->set_turn_tokens(result.turn_tokens);
  proto->set_total_tokens(result.total_tokens);
  proto->set_hot_tokens(result.hot_tokens);
  proto->set_evicted(result.evicted);
  proto->set_recalled_blocks(result.recalled_blocks);
  proto->set_warm_hits(result.warm_hits);
  proto->set_cold_reads(result.cold_reads);
  proto->mutable_timings()->set_prefill_ms(result.prefill_ms);
  proto->mutable_timings()->set_select_ms(result.select_ms);
  proto->mutable_timings()->set_commit_ms(result.commit_ms);
}

void GenerateResultToProto(const GenerateResult& result, v1::GenerateUsage* proto) {
  proto->set_generated_tokens(static_cast<int64_t>(result.generation.tokens.size()));
  proto->set_finish_reason(FinishReasonToProto(result.generation.finish));
  proto->set_turn_index(result.turn_index);
  proto->set_hot_tokens_attended(result.hot_attended);
  proto->set_evicted(result.evicted);
  proto->set_text(result.generation.text);
  proto->mutable_timings()->set_decode_ms(result.decode_ms);
  proto->mutable_timings()->set_select_ms(result.select_ms);
}

}  // namespace kvmem
