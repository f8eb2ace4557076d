// Named chat templates: how a turn (role, text) becomes tokens.
//
// A session's turns form one conversation string, with special tokens (written <s>, </s>,
// <|im_start|>, <|im_end|>) as ids between runs of text. The tokens are what a Hugging Face
// tokenizer without the legacy per-segment prefix (LlamaTokenizer legacy=False) gives for that
// whole string with the special tokens split out: sentencepiece's dummy-prefix space goes
// once, on the first text of the session's first turn, and every other run of text is encoded
// as the continuation it is (Tokenizer::EncodeContinuation), so it starts a word ("▁...")
// only where the string has a space there. Text after a special token or a turn boundary
// therefore gets no spurious "▁": zephyr's "\n" after </s> is the newline alone. (One
// difference: Hugging Face drops the prefix when the string opens with a special token; here
// chatml's first "user" keeps it.) Each turn is tokenized on its own, so no piece spans a turn
// boundary; where the vocabulary has no piece spanning a space or a newline (sentencepiece's
// default; stories260K) that equals tokenizing the whole string.
// The strings, turn by turn ("|" marks turn boundaries, u/a/s the texts):
//
//   raw     base models, roles ignored: turns joined by single spaces after one BOS.
//             <s>u1| u2| u3
//           A generated turn continues the text directly.
//   llama2  <s>[INST] u1 [/INST]| a1</s>|<s> [INST] u2 [/INST]
//           system: "[INST] <<SYS>>\ns\n<</SYS>> [/INST]", tool: "[INST] [TOOL] t [/INST]".
//           Every instruction starts a word ("▁[INST]"), as in Meta's reference encoder,
//           which encodes each dialog round as a fresh string; the first gets that space from
//           the dummy prefix, later ones from the string. An answer follows "[/INST]" after a
//           space and ends with EOS (no space before it); a session that opens with an
//           answer opens with BOS.
//   zephyr  <s><|user|>\nu1</s>\n|<|assistant|>\na1</s>\n|...
//           "<|role|>" is plain text; a generated turn is opened by "<|assistant|>\n".
//   chatml  <|im_start|>user\nu1<|im_end|>\n|<|im_start|>assistant\na1<|im_end|>\n|...
//           needs <|im_start|> and <|im_end|> pieces; no BOS.
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
  // Tokens of a whole turn. `first` is true for the session's first turn: it opens the
  // conversation string (BOS where the template has one, the dummy prefix on its first text).
  virtual absl::StatusOr<std::vector<int32_t>> EncodeTurn(Role role, std::string_view text,
                                                          bool first) const = 0;
  // Tokens that open a generated assistant turn, before decoding starts; `first` as above.
  virtual absl::StatusOr<std::vector<int32_t>> AssistantPrefix(bool first) const = 0;
  // Tokens that close a generated assistant turn after its text.
  virtual std::vector<int32_t> AssistantSuffix() const = 0;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_CHAT_TEMPLATE_H_
