// Helpers shared by the tests: temporary directories and random Llama models written to disk.
#ifndef KVMEM_TESTS_TEST_UTIL_H_
#define KVMEM_TESTS_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "nlohmann/json.hpp"

namespace kvmem::testing {

// A fresh directory under the system temp dir, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvmem-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The shape of a random test model; fields mirror config.json.
struct RandomModelSpec {
  int hidden = 32;
  int intermediate = 48;
  int layers = 2;
  int heads = 4;
  int kv_heads = 2;
  int head_dim = 8;
  int vocab = 64;
  bool attention_bias = false;
  bool mlp_bias = false;
  bool tie_embeddings = false;
  double rope_theta = 10000.0;
  nlohmann::json rope_scaling = nullptr;
  int sliding_window = 0;
  DType dtype = DType::kF32;
  uint32_t seed = 1;
};

inline std::vector<uint8_t> EncodeValues(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * DTypeSize(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(&bytes[4 * i], &values[i], 4);
    } else {
      uint16_t h = dtype == DType::kBF16 ? FloatToBFloat16(values[i]) : FloatToHalf(values[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

inline nlohmann::json ConfigJson(const RandomModelSpec& s) {
  nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", s.hidden},
      {"intermediate_size", s.intermediate},
      {"num_hidden_layers", s.layers},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"head_dim", s.head_dim},
      {"vocab_size", s.vocab},
      {"max_position_embeddings", 512},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", s.rope_theta},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", s.tie_embeddings},
      {"attention_bias", s.attention_bias},
      {"mlp_bias", s.mlp_bias},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
  };
  if (!s.rope_scaling.is_null()) config["rope_scaling"] = s.rope_scaling;
  if (s.sliding_window > 0) config["sliding_window"] = s.sliding_window;
  return config;
}

// The tensors of a random model, named as Hugging Face names them.
inline std::vector<TensorToWrite> RandomTensors(const RandomModelSpec& s) {
  std::mt19937 rng(s.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale, float offset) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> values(n);
    for (float& v : values) v = offset + scale * normal(rng);
    tensors.push_back({name, s.dtype, shape, EncodeValues(values, s.dtype)});
  };
  const int q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  const float wscale = 1.0f / std::sqrt(static_cast<float>(s.hidden));
  add("model.embed_tokens.weight", {s.vocab, s.hidden}, 1.0f, 0.0f);
  add("model.norm.weight", {s.hidden}, 0.1f, 1.0f);
  if (!s.tie_embeddings) add("lm_head.weight", {s.vocab, s.hidden}, wscale, 0.0f);
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {s.hidden}, 0.1f, 1.0f);
    add(p + "post_attention_layernorm.weight", {s.hidden}, 0.1f, 1.0f);
    add(p + "self_attn.q_proj.weight", {q, s.hidden}, 2 * wscale, 0.0f);
    add(p + "self_attn.k_proj.weight", {kv, s.hidden}, 2 * wscale, 0.0f);
    add(p + "self_attn.v_proj.weight", {kv, s.hidden}, wscale, 0.0f);
    add(p + "self_attn.o_proj.weight", {s.hidden, q}, wscale, 0.0f);
    add(p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}, wscale, 0.0f);
    add(p + "mlp.up_proj.weight", {s.intermediate, s.hidden}, wscale, 0.0f);
    add(p + "mlp.down_proj.weight", {s.hidden, s.intermediate}, wscale, 0.0f);
    if (s.attention_bias) {
      add(p + "self_attn.q_proj.bias", {q}, 0.1f, 0.0f);
      add(p + "self_attn.k_proj.bias", {kv}, 0.1f, 0.0f);
      add(p + "self_attn.v_proj.bias", {kv}, 0.1f, 0.0f);
      add(p + "self_attn.o_proj.bias", {s.hidden}, 0.1f, 0.0f);
    }
    if (s.mlp_bias) {
      add(p + "mlp.gate_proj.bias", {s.intermediate}, 0.1f, 0.0f);
      add(p + "mlp.up_proj.bias", {s.intermediate}, 0.1f, 0.0f);
      add(p + "mlp.down_proj.bias", {s.hidden}, 0.1f, 0.0f);
    }
  }
  return tensors;
}

// Writes config.json and model.safetensors of a random model into `dir`.
inline void WriteRandomModel(const std::string& dir, const RandomModelSpec& spec) {
  WriteText(dir + "/config.json", ConfigJson(spec).dump(2));
  auto status = WriteSafetensors(dir + "/model.safetensors", RandomTensors(spec));
  if (!status.ok()) throw std::runtime_error(std::string(status.message()));
}

}  // namespace kvmem::testing

#endif  // KVMEM_TESTS_TEST_UTIL_H_
