// The shape and hyper-parameters of a Llama-family model, read from Hugging Face config.json.
#ifndef KVMEM_ENGINE_MODEL_CONFIG_H_
#define KVMEM_ENGINE_MODEL_CONFIG_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvmem {

// RoPE frequency scaling (config.json "rope_scaling").
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  // Default: 1. Divides every frequency (linear) or the low ones (llama3).
  double factor = 1.0;
  // Default: 1. llama3: wavelengths above original_max / low_freq_factor are fully scaled.
  double low_freq_factor = 1.0;
  // Default: 4. llama3: wavelengths below original_max / high_freq_factor are unscaled.
  double high_freq_factor = 4.0;
  // Default: 8192. llama3: the context the model was pre-trained with.
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // LlamaForCausalLM or MistralForCausalLM
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  // Mistral's sliding-window attention: a query at position p sees keys at positions
  // > p - sliding_window. 0 means unlimited.
  int sliding_window = 0;
  int bos_token_id = 1;
  std::vector<int> eos_token_ids = {2};

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int group_size() const { return num_heads / num_kv_heads; }

  // Parses and validates config.json text. INVALID_ARGUMENT names the offending field;
  // FAILED_PRECONDITION for a well-formed config of an architecture kvmem does not run.
  static absl::StatusOr<ModelConfig> FromJson(std::string_view json);

  // The RoPE inverse frequencies, one per rotated pair: (head_dim / 2).
  std::vector<double> RopeInverseFrequencies() const;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_MODEL_CONFIG_H_
