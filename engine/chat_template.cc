#include "engine/chat_template.h"

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

class TemplateBase : public ChatTemplate {
 public:
  TemplateBase(const Tokenizer& tokenizer, const ModelConfig& config)
      : tokenizer_(tokenizer), bos_(config.bos_token_id), eos_(config.eos_token_ids.front()) {}

 protected:
  absl::StatusOr<std::vector<int32_t>> Encode(const std::vector<Segment>& segments) const {
    std::vector<int32_t> out;
    for (const Segment& s : segments) {
      if (s.token >= 0) {
        out.push_back(s.token);
        continue;
      }
      if (s.text.empty()) continue;
      std::vector<int> ids;
      std::string error;
      if (!tokenizer_.Encode(s.text, &ids, &error)) {
        return absl::InvalidArgumentError(absl::StrCat("cannot encode text: ", error));
      }
      out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
  }
  Segment Bos() const { return {"", bos_}; }
  Segment Eos() const { return {"", eos_}; }
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
    std::vector<Segment> s;
    if (first) s.push_back(Bos());
    s.push_back(Text(text));
    return Encode(s);
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    return Encode(first ? std::vector<Segment>{Bos()} : std::vector<Segment>{});
  }
  std::vector<int32_t> AssistantSuffix() const override { return {}; }
};

class Llama2Template : public TemplateBase {
 public:
  using TemplateBase::TemplateBase;
  const char* name() const override { return "llama2"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool first) const override {
    switch (role) {
      case Role::kSystem:
        return Encode({Bos(), Text(absl::StrCat("[INST] <<SYS>>\n", std::string(text),
                                                "\n<</SYS>> [/INST]"))});
      case Role::kUser:
        return Encode({Bos(), Text(absl::StrCat("[INST] ", std::string(text), " [/INST]"))});
      case Role::kTool:
        return Encode({Bos(), Text(absl::StrCat("[INST] [TOOL] ", std::string(text), " [/INST]"))});
      case Role::kAssistant:
        return Encode({Text(text), Eos()});
    }
    return absl::InternalError("unreachable");
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    return Encode(first ? std::vector<Segment>{Bos()} : std::vector<Segment>{});
  }
  std::vector<int32_t> AssistantSuffix() const override { return {eos_}; }
};

class ZephyrTemplate : public TemplateBase {
 public:
  using TemplateBase::TemplateBase;
  const char* name() const override { return "zephyr"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool first) const override {
    std::vector<Segment> s;
    if (first) s.push_back(Bos());
    s.push_back(Text(absl::StrCat("<|", RoleName(role), "|>\n", std::string(text))));
    s.push_back(Eos());
    s.push_back(Text("\n"));
    return Encode(s);
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const override {
    std::vector<Segment> s;
    if (first) s.push_back(Bos());
    s.push_back(Text("<|assistant|>\n"));
    return Encode(s);
  }
  std::vector<int32_t> AssistantSuffix() const override {
    auto nl = Encode({Text("\n")});
    std::vector<int32_t> out = {eos_};
    if (nl.ok()) out.insert(out.end(), nl->begin(), nl->end());
    return out;
  }
};

class ChatMlTemplate : public TemplateBase {
 public:
  ChatMlTemplate(const Tokenizer& tokenizer, const ModelConfig& config, int32_t start, int32_t end)
      : TemplateBase(tokenizer, config), start_(start), end_(end) {}
  const char* name() const override { return "chatml"; }
  absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                  bool) const override {
    return Encode({{"", start_}, Text(absl::StrCat(RoleName(role), "\n", std::string(text))),
                   {"", end_}, Text("\n")});
  }
  absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool) const override {
    return Encode({{"", start_}, Text("assistant\n")});
  }
  std::vector<int32_t> AssistantSuffix() const override {
    auto nl = Encode({Text("\n")});
    std::vector<int32_t> out = {end_};
    if (nl.ok()) out.insert(out.end(), nl->begin(), nl->end());
    return out;
  }

 private:
  int32_t start_;
  int32_t end_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Make(std::string_view name,
                                                                 const Tokenizer& tokenizer,
                                                                 const ModelConfig& config) {
  if (name == "raw") return std::unique_ptr<ChatTemplate>(new RawTemplate(tokenizer, config));
  if (name == "llama2") return std::unique_ptr<ChatTemplate>(new Llama2Template(tokenizer, config));
  if (name == "zephyr") return std::unique_ptr<ChatTemplate>(new ZephyrTemplate(tokenizer, config));
  if (name == "chatml") {
    const int start = tokenizer.PieceToId("<|im_start|>");
    const int end = tokenizer.PieceToId("<|im_end|>");
    if (start < 0 || end < 0) {
      return absl::FailedPreconditionError(
          "chat template chatml needs the tokens <|im_start|> and <|im_end|>, which this "
          "model's tokenizer lacks; choose raw, llama2 or zephyr");
    }
    return std::unique_ptr<ChatTemplate>(new ChatMlTemplate(tokenizer, config, start, end));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown chat template \"", std::string(name),
                                                 "\": use raw, llama2, zephyr or chatml"));
}

}  // namespace kvmem
