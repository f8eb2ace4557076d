// Model shapes the benchmarks run at, with random or no weights (speed does not depend on the
// values): "1b" is Llama-3.2-1B, "8b" is Llama-3-8B, "tiny" a 2-layer toy for smoke runs.
#ifndef KVMEM_BENCH_MODEL_SHAPES_H_
#define KVMEM_BENCH_MODEL_SHAPES_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/model_config.h"

namespace kvmem {

struct ModelShape {
  std::string name;  // e.g. "Llama-3-8B"
  ModelConfig config;
};

// INVALID_ARGUMENT for names other than "1b", "8b" and "tiny".
inline absl::StatusOr<ModelShape> NamedModelShape(const std::string& key) {
  auto llama = [](int hidden, int inter, int layers, int heads, int kv_heads, bool tied) {
    ModelConfig c;
    c.architecture = "LlamaForCausalLM";
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.num_layers = layers;
    c.num_heads = heads;
    c.num_kv_heads = kv_heads;
    c.head_dim = hidden / heads;
    c.vocab_size = 128256;
    c.max_position_embeddings = 131072;
    c.rope_theta = 500000.0;
    c.tie_word_embeddings = tied;
    return c;
  };
  if (key == "1b") return ModelShape{"Llama-3.2-1B", llama(2048, 8192, 16, 32, 8, true)};
  if (key == "8b") return ModelShape{"Llama-3-8B", llama(4096, 14336, 32, 32, 8, false)};
  if (key == "tiny") {  // smoke runs (the CUDA emulator), not measurements
    ModelShape tiny{"tiny", llama(128, 256, 2, 4, 2, false)};
    tiny.config.vocab_size = 512;
    return tiny;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown shape ", key, " (1b, 8b or tiny)"));
}

}  // namespace kvmem

#endif  // KVMEM_BENCH_MODEL_SHAPES_H_
