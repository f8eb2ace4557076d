#include "engine/chat_template.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {

absl::StatusOr<Role> ParseRole(std::string_view name) {
  if (name == "system") return Role::kSystem;
  if (name == "user") return Role::kUser;
  if (name == "assistant") return Role::kAssistant;
  if (name == "tool") return Role::kTool;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown role \"", std::string(name), "\": use system, user, assistant or tool"));
}

const char* RoleName(Role role) {
  switch (role) {
    case Role::kSystem: return "system";
    case Role::kUser: return "user";
    case Role::kAssistant: return "assistant";
    case Role::kTool: return "tool";
  }
  return "unknown";
}

namespace {

// A piece of a formatted turn: text to encode, or one token id.
struct Segment {
  std::string text;
  int32_t token = -1;
};

// Encodes text with the tokenizer, as the start of the conversation (`fresh`, with the
// dummy-prefix space) or as a continuation of it.
absl::StatusOr<std::vector<int32_t>> EncodeText(const Tokenizer& tokenizer, std::string_view text,
                                                bool fresh) {
  std::vector<int> ids;
  std::string error;
  const bool ok = fresh ? tokenizer.Encode(text, &ids, &error)
                        : tokenizer.EncodeContinuation(text, &ids, &error);
  if (!ok) return absl::InvalidArgumentError(absl::StrCat("cannot encode text: ", error));
  return std::vector<int32_t>(ids.begin(), ids.end());
}

class TemplateBase : public ChatTemplate {
 public:
  TemplateBase(const Tokenizer& tokenizer, const ModelConfig& config)
      : tokenizer_(tokenizer), bos_(config.bos_token_id), eos_(config.eos_token_ids.front()) {}

 protected:
  // Encodes a turn's segments. Adjacent text segments must have been joined by the caller:
  // each text segment ends at a special token or at the end of the turn. When `first` (the
  // session's first turn), the first text segment is encoded as the start of the
  // conversation; every other one as a continuation (see chat_template.h).
  absl::StatusOr<std::vector<int32_t>> Encode(const std::vector<Segment>& segments,
                                              bool first) const {
    std::vector<int32_t> out;
    bool fresh = first;
    for (const Segment& s : segments) {
      if (s.token >= 0) {
        out.push_back(s.token);
        continue;
      }
      if (s.text.empty()) continue;
      KVMEM_ASSIGN_OR_RETURN(std::vector<int32_t> ids, EncodeText(tokenizer_, s.text, fresh));
      fresh = false;
      out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
  }
  Segment Bos() const { return {"", bos_}; }
  Segment Eos() const { return {"", eos_}; }
  static Segment Token(int32_t id) { return {"", id}; }
  static Segment Text(std::string_view t) { return {std::string(t), -1}; }

  const Tokenizer& tokenizer_;
  int32_t bos_;
  int32_t eos_;
};

class RawTemplate : public TemplateBase {
 public:
  using TemplateBase::TemplateBase;
  const char* name() const override { return "raw"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role, std::string_view text,
                                                  bool first) const override {
    if (first) return Encode({Bos(), Text(text)}, first);
    return Encode({Text(absl::StrCat(" ", std::string(text)))}, first);
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    return first ? std::vector<int32_t>{bos_} : std::vector<int32_t>{};
  }
  std::vector<int32_t> AssistantSuffix() const override { return {}; }
};

class Llama2Template : public TemplateBase {
 public:
  using TemplateBase::TemplateBase;
  const char* name() const override { return "llama2"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool first) const override {
    // Later instructions carry the space the first one gets from the dummy prefix.
    const char* open = first ? "[INST] " : " [INST] ";
    switch (role) {
      case Role::kSystem:
        return Encode(
            {Bos(), Text(absl::StrCat(open, "<<SYS>>\n", std::string(text), "\n<</SYS>> [/INST]"))},
            first);
      case Role::kUser:
        return Encode({Bos(), Text(absl::StrCat(open, std::string(text), " [/INST]"))}, first);
      case Role::kTool:
        return Encode({Bos(), Text(absl::StrCat(open, "[TOOL] ", std::string(text), " [/INST]"))},
                      first);
      case Role::kAssistant:
        // An answer opening the session still opens it with BOS, as AssistantPrefix does.
        if (first) return Encode({Bos(), Text(text), Eos()}, first);
        return Encode({Text(absl::StrCat(" ", std::string(text))), Eos()}, first);
    }
    return absl::InternalError("unreachable");
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    return first ? std::vector<int32_t>{bos_} : std::vector<int32_t>{};
  }
  std::vector<int32_t> AssistantSuffix() const override { return {eos_}; }
};

class ZephyrTemplate : public TemplateBase {
 public:
  // `newline`: "\n" encoded as a continuation.
  ZephyrTemplate(const Tokenizer& tokenizer, const ModelConfig& config,
                 std::vector<int32_t> newline)
      : TemplateBase(tokenizer, config), newline_(std::move(newline)) {}
  const char* name() const override { return "zephyr"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool first) const override {
    std::vector<Segment> s;
    if (first) s.push_back(Bos());
    s.push_back(Text(absl::StrCat("<|", RoleName(role), "|>\n", std::string(text))));
    s.push_back(Eos());
    s.push_back(Text("\n"));
    return Encode(s, first);
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    std::vector<Segment> s;
    if (first) s.push_back(Bos());
    s.push_back(Text("<|assistant|>\n"));
    return Encode(s, first);
  }
  std::vector<int32_t> AssistantSuffix() const override {
    std::vector<int32_t> out = {eos_};
    out.insert(out.end(), newline_.begin(), newline_.end());
    return out;
  }

 private:
  std::vector<int32_t> newline_;
};

class ChatMlTemplate : public TemplateBase {
 public:
  // `newline`: "\n" encoded as a continuation.
  ChatMlTemplate(const Tokenizer& tokenizer, const ModelConfig& config, int32_t start, int32_t end,
                 std::vector<int32_t> newline)
      : TemplateBase(tokenizer, config), start_(start), end_(end), newline_(std::move(newline)) {}
  const char* name() const override { return "chatml"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool first) const override {
    return Encode({Token(start_), Text(absl::StrCat(RoleName(role), "\n", std::string(text))),
                   Token(end_), Text("\n")},
                  first);
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    return Encode({Token(start_), Text("assistant\n")}, first);
  }
  std::vector<int32_t> AssistantSuffix() const override {
    std::vector<int32_t> out = {end_};
    out.insert(out.end(), newline_.begin(), newline_.end());
    return out;
  }

 private:
  int32_t start_;
  int32_t end_;
  std::vector<int32_t> newline_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Make(std::string_view name,
                                                                 const Tokenizer& tokenizer,
                                                                 const ModelConfig& config) {
  if (name == "raw") return std::unique_ptr<ChatTemplate>(new RawTemplate(tokenizer, config));
  if (name == "llama2") return std::unique_ptr<ChatTemplate>(new Llama2Template(tokenizer, config));
  if (name != "zephyr" && name != "chatml") {
    return absl::InvalidArgumentError(absl::StrCat("unknown chat template \"", std::string(name),
                                                   "\": use raw, llama2, zephyr or chatml"));
  }
  const int start = tokenizer.PieceToId("<|im_start|>");
  const int end = tokenizer.PieceToId("<|im_end|>");
  if (name == "chatml" && (start < 0 || end < 0)) {
    return absl::FailedPreconditionError(
        "chat template chatml needs the tokens <|im_start|> and <|im_end|>, which this "
        "model's tokenizer lacks; choose raw, llama2 or zephyr");
  }
  // Both end a turn with "\n" after a special token; AssistantSuffix cannot fail, so the
  // newline is encoded here.
  auto newline = EncodeText(tokenizer, "\n", /*fresh=*/false);
  if (!newline.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("chat template ", std::string(name),
                     " cannot encode its turn separator: ", newline.status().message()));
  }
  if (name == "zephyr") {
    return std::unique_ptr<ChatTemplate>(
        new ZephyrTemplate(tokenizer, config, std::move(*newline)));
  }
  return std::unique_ptr<ChatTemplate>(
      new ChatMlTemplate(tokenizer, config, start, end, std::move(*newline)));
}

}  // namespace kvmem
