// Named chat templates: how a turn (role, text) becomes tokens.
//
//   raw     base models: BOS opens the session; each turn is its text encoded on its own
//           (sentencepiece adds its leading space), no separators, roles ignored.
//   llama2  "[INST] text [/INST]" user turns (system: "[INST] <<SYS>>\ntext\n<</SYS>> [/INST]"),
//           assistant turns end with EOS; BOS before each instruction.
//   zephyr  "<|role|>\ntext" + EOS + "\n"; BOS opens the session.
//   chatml  "<|im_start|>role\ntext<|im_end|>\n"; needs <|im_start|> and <|im_end|> pieces.
// Text segments are encoded one at a time, so each gets sentencepiece's dummy-prefix space.
#ifndef KVMEM_ENGINE_CHAT_TEMPLATE_H_
#define KVMEM_ENGINE_CHAT_TEMPLATE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"

namespace kvmem {

enum class Role { kSystem, kUser, kAssistant, kTool };
// "system", "user", "assistant", "tool"; INVALID_ARGUMENT otherwise.
absl::StatusOr<Role> ParseRole(std::string_view name);
const char* RoleName(Role role);

class ChatTemplate {
 public:
  // INVALID_ARGUMENT for an unknown name; FAILED_PRECONDITION when the tokenizer lacks the
  // special tokens the template needs.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Make(std::string_view name,
                                                            const Tokenizer& tokenizer,
                                                            const ModelConfig& config);
  virtual ~ChatTemplate() = default;
  virtual const char* name() const = 0;
  // Tokens of a whole turn. `first` is true for the session's first turn.
  virtual absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                          bool first) const = 0;
  // Tokens that open a generated assistant turn, before decoding starts.
  virtual absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const = 0;
  // Tokens that close a generated assistant turn after its text.
  virtual std::vector<int32_t> AssistantSuffix() const = 0;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_CHAT_TEMPLATE_H_
