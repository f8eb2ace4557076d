#include "engine/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

// Length of the longest prefix of `s` that ends on a UTF-8 character boundary.
size_t Utf8Boundary(const std::string& s, size_t len) {
  while (len > 0 && len < s.size() && (static_cast<unsigned char>(s[len]) & 0xC0) == 0x80) --len;
  return len;
}

// True when `s` ends in the middle of a character: a replacement character (what
// sentencepiece decodes a lone byte-fallback piece to) or a lead byte missing continuations.
bool EndsInsideCharacter(const std::string& s) {
  if (s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0) return true;
  size_t i = s.size();
  int continuation = 0;
  while (i > 0 && continuation < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++continuation;
  }
  if (i == 0) return false;
  const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
  const int need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
  return continuation < need;
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kEos: return "eos";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "unknown";
}

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<int> context,
                       std::vector<std::string> stop)
    : tokenizer_(tokenizer), ids_(std::move(context)), stop_(std::move(stop)) {
  base_ = tokenizer_.Decode(ids_);
  for (const std::string& s : stop_) hold_ = std::max(hold_, s.empty() ? 0 : s.size() - 1);
}

std::string TextStream::Push(int token, bool* stopped) {
  *stopped = stopped_;
  if (stopped_) return "";
  ids_.push_back(token);
  std::string full = tokenizer_.Decode(ids_);
  if (full.compare(0, base_.size(), base_) == 0) {
    text_ = full.substr(base_.size());
  } else {  // the context decodes differently once followed by more text: re-anchor
    text_ = full;
    base_.clear();
  }
  size_t limit = text_.size();
  for (const std::string& s : stop_) {
    size_t at = text_.find(s);
    if (at != std::string::npos && at < limit) {
      limit = at;
      stopped_ = true;
    }
  }
  if (stopped_) {
    text_.resize(limit);
  } else {
    if (EndsInsideCharacter(text_)) return "";  // an incomplete UTF-8 sequence
    limit = limit > hold_ ? limit - hold_ : 0;
  }
  *stopped = stopped_;
  limit = Utf8Boundary(text_, limit);
  if (limit <= emitted_) return "";
  std::string delta = text_.substr(emitted_, limit - emitted_);
  emitted_ = limit;
  return delta;
}

std::string TextStream::Flush() {
  if (emitted_ >= text_.size()) return "";
  std::string delta = text_.substr(emitted_);
  emitted_ = text_.size();
  return delta;
}

absl::StatusOr<GenerationResult> DecodeTokens(const Model& model, Backend& backend, KvCache* kv,
                                              DecodeRequest request, const SamplingParams& params,
                                              const TextCallback& on_text) {
  KVMEM_RETURN_IF_ERROR(ValidateSamplingParams(params));
  if (model.tokenizer() == nullptr) {
    return absl::FailedPreconditionError("generation needs the model's tokenizer");
  }
  const int vocab = model.config().vocab_size;
  if (static_cast<int>(request.logits.size()) != vocab) {
    return absl::InvalidArgumentError("DecodeTokens needs the logits of the last token");
  }
  Sampler sampler(params);
  TextStream stream(*model.tokenizer(), std::move(request.context), params.stop);
  GenerationResult result;
  std::vector<float> logits = std::move(request.logits);
  ForwardResult forward;
  for (int step = 0; step < params.max_tokens; ++step) {
    if (request.cancelled && request.cancelled()) {
      result.finish = FinishReason::kCancelled;
      break;
    }
    const int token = sampler.Sample(logits.data(), vocab);
    if (!params.ignore_eos && model.IsEos(token)) {
      result.finish = FinishReason::kEos;
      break;
    }
    result.tokens.push_back(token);
    bool stopped = false;
    std::string delta = stream.Push(token, &stopped);
    if (!delta.empty() && on_text && !on_text(delta)) {
      result.finish = FinishReason::kCancelled;
      break;
    }
    if (stopped) {
      result.finish = FinishReason::kStop;
      break;
    }
    const bool last = step + 1 == params.max_tokens;
    if (last && !request.feed_final_token) break;
    const int32_t fed = token;
    KVMEM_RETURN_IF_ERROR(backend.Forward(absl::MakeConstSpan(&fed, 1), *request.next_position,
                                          kv, request.forward_options, &forward));
    ++*request.next_position;
    ++result.decode_steps;
    if (request.on_forward) request.on_forward(forward);
    logits.swap(forward.logits);
  }
  if (result.finish != FinishReason::kCancelled) {
    std::string rest = stream.Flush();
    if (!rest.empty() && on_text) on_text(rest);
  }
  result.text = stream.text();
  result.last_logits = std::move(logits);
  return result;
}

absl::StatusOr<GenerationResult> Complete(const Model& model, Backend& backend,
                                          std::string_view prompt, const SamplingParams& params,
                                          const TextCallback& on_text) {
  KVMEM_RETURN_IF_ERROR(ValidateSamplingParams(params));
  const Tokenizer* tokenizer = model.tokenizer();
  if (tokenizer == nullptr) return absl::FailedPreconditionError("completion needs a tokenizer");
  std::vector<int> ids;
  std::string error;
  if (!tokenizer->Encode(prompt, &ids, &error)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot encode the prompt: ", error));
  }
  std::vector<int32_t> prompt_ids;
  prompt_ids.push_back(model.config().bos_token_id);
  prompt_ids.insert(prompt_ids.end(), ids.begin(), ids.end());

  const ModelConfig& c = model.config();
  KvCache kv(c.num_layers, c.num_kv_heads, c.head_dim);
  ForwardResult prefill;
  KVMEM_RETURN_IF_ERROR(backend.Forward(prompt_ids, 0, &kv, ForwardOptions{}, &prefill));
  int64_t position = static_cast<int64_t>(prompt_ids.size());
  DecodeRequest request;
  request.logits = std::move(prefill.logits);
  request.next_position = &position;
  const size_t context = std::min<size_t>(prompt_ids.size(), 8);
  request.context.assign(prompt_ids.end() - context, prompt_ids.end());
  request.feed_final_token = false;
  return DecodeTokens(model, backend, &kv, std::move(request), params, on_text);
}

}  // namespace kvmem
