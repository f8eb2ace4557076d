// A loaded Llama-family model: config, f32 weights, tokenizer and fingerprint.
#ifndef KVMEM_ENGINE_MODEL_H_
#define KVMEM_ENGINE_MODEL_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"

namespace kvmem {

// Weights of one decoder layer, all f32, row-major in Hugging Face's (out, in) layout.
// Bias pointers are null when the config has no bias.
struct LayerWeights {
  const float* attn_norm = nullptr;  // (hidden)
  const float* wq = nullptr;         // (num_heads * head_dim, hidden)
  const float* wk = nullptr;         // (num_kv_heads * head_dim, hidden)
  const float* wv = nullptr;         // (num_kv_heads * head_dim, hidden)
  const float* wo = nullptr;         // (hidden, num_heads * head_dim)
  const float* bq = nullptr;         // (num_heads * head_dim)
  const float* bk = nullptr;         // (num_kv_heads * head_dim)
  const float* bv = nullptr;         // (num_kv_heads * head_dim)
  const float* bo = nullptr;         // (hidden)
  const float* mlp_norm = nullptr;   // (hidden)
  const float* w_gate = nullptr;     // (intermediate, hidden)
  const float* w_up = nullptr;       // (intermediate, hidden)
  const float* w_down = nullptr;     // (hidden, intermediate)
  const float* b_gate = nullptr;     // (intermediate)
  const float* b_up = nullptr;       // (intermediate)
  const float* b_down = nullptr;     // (hidden)
};

struct ModelWeights {
  const float* embed = nullptr;       // (vocab, hidden)
  std::vector<LayerWeights> layers;   // (num_layers)
  const float* final_norm = nullptr;  // (hidden)
  const float* lm_head = nullptr;     // (vocab, hidden); == embed when tied
};

struct ModelLoadOptions {
  // Default: true. A model without tokenizer.model loads only when false (tests that write
  // random weights and feed token ids directly).
  bool require_tokenizer = true;
};

class Model {
 public:
  // Loads config.json, model.safetensors or the shards named by model.safetensors.index.json
  // (else every *.safetensors in the directory), and tokenizer.model.
  // NOT_FOUND: directory or a required file missing. INVALID_ARGUMENT: malformed config,
  // safetensors or tokenizer, missing tensors, wrong shapes or dtypes. FAILED_PRECONDITION:
  // an architecture or feature kvmem does not run.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const ModelLoadOptions& options = {});

  // A model of `config`'s shape with no weights: for benchmarks of the work around the forward
  // pass, with a backend that needs no host weights (a stand-in, or the CUDA backend's random
  // device weights). weights() is empty; the fingerprint covers the shape and the tokenizer.
  static std::unique_ptr<Model> Shaped(const ModelConfig& config,
                                       std::unique_ptr<Tokenizer> tokenizer);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  // Null only when loaded with require_tokenizer = false and no tokenizer.model exists.
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  // 32 hex digits identifying these weights: SHA-256 over config.json, every safetensors
  // header, every tensor's bytes and the tokenizer. Persisted sessions record it
  // so KV is never reused under different weights.
  const std::string& fingerprint() const { return fingerprint_; }
  bool IsEos(int token) const;

 private:
  Model() = default;
  absl::Status LoadWeights(const std::vector<std::string>& files);
  absl::StatusOr<const float*> Tensor(const std::string& name, std::vector<int64_t> shape);
  absl::StatusOr<const float*> OptionalTensor(const std::string& name, bool present,
                                              std::vector<int64_t> shape);
  void ComputeFingerprint(const std::string& config_text);

  std::string dir_;
  ModelConfig config_;
  ModelWeights weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string fingerprint_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;  // sorted by path
  std::map<std::string, const TensorView*> tensor_index_;
  std::vector<std::vector<float>> converted_;  // f32 copies of F16/BF16/unaligned tensors
};

// The model directory to use: `flag` when set, else $KVMEM_MODEL, else
// ../shared/models/stories260K beside the project root when present. NOT_FOUND otherwise,
// with a message that says how to point at a model.
absl::StatusOr<std::string> ResolveModelDir(const std::string& flag);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_MODEL_H_
