#include "engine/model_config.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvmem {
namespace {

using Json = nlohmann::json;

absl::Status BadField(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: \"", field, "\" ", what));
}

// Reads a positive integer field; `fallback` < 0 means the field is required.
absl::StatusOr<int> PositiveInt(const Json& j, const char* field, int fallback = -1) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (fallback >= 0) return fallback;
    return BadField(field, "is missing");
  }
  if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > (1 << 30)) {
    return BadField(field, "must be a positive integer");
  }
  return static_cast<int>(it->get<int64_t>());
}

absl::StatusOr<double> PositiveNumber(const Json& j, const char* field, double fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number() || !(it->get<double>() > 0)) return BadField(field, "must be a positive number");
  return it->get<double>();
}

absl::StatusOr<bool> Bool(const Json& j, const char* field, bool fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return BadField(field, "must be true or false");
  return it->get<bool>();
}

#define KVMEM_CONFIG_FIELD(lhs, expr) \
  do {                                \
    auto v_ = (expr);                 \
    if (!v_.ok()) return v_.status(); \
    lhs = *v_;                        \
  } while (0)

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(std::string_view text) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json is not a JSON object");

  ModelConfig c;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->empty() || !(*arch)[0].is_string()) {
    return BadField("architectures", "is missing (expected [\"LlamaForCausalLM\"])");
  }
  c.architecture = (*arch)[0].get<std::string>();
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM") {
    return absl::FailedPreconditionError(absl::StrCat(
        "unsupported architecture ", c.architecture,
        ": kvmem runs LlamaForCausalLM and MistralForCausalLM models"));
  }
  auto act = j.find("hidden_act");
  if (act != j.end() && !(act->is_string() && act->get<std::string>() == "silu")) {
    return absl::FailedPreconditionError("unsupported hidden_act: kvmem runs SwiGLU (silu) MLPs");
  }

  KVMEM_CONFIG_FIELD(c.hidden_size, PositiveInt(j, "hidden_size"));
  KVMEM_CONFIG_FIELD(c.intermediate_size, PositiveInt(j, "intermediate_size"));
  KVMEM_CONFIG_FIELD(c.num_layers, PositiveInt(j, "num_hidden_layers"));
  KVMEM_CONFIG_FIELD(c.num_heads, PositiveInt(j, "num_attention_heads"));
  KVMEM_CONFIG_FIELD(c.num_kv_heads, PositiveInt(j, "num_key_value_heads", c.num_heads));
  KVMEM_CONFIG_FIELD(c.vocab_size, PositiveInt(j, "vocab_size"));
  KVMEM_CONFIG_FIELD(c.max_position_embeddings, PositiveInt(j, "max_position_embeddings", 2048));
  if (c.hidden_size % c.num_heads != 0 && j.find("head_dim") == j.end()) {
    return BadField("hidden_size", "is not a multiple of num_attention_heads and no head_dim is given");
  }
  KVMEM_CONFIG_FIELD(c.head_dim, PositiveInt(j, "head_dim", c.hidden_size / c.num_heads));
  if (c.head_dim % 2 != 0) return BadField("head_dim", "must be even for RoPE");
  if (c.num_heads % c.num_kv_heads != 0) {
    return BadField("num_key_value_heads", "must divide num_attention_heads");
  }
  KVMEM_CONFIG_FIELD(c.rms_norm_eps, PositiveNumber(j, "rms_norm_eps", 1e-6));
  KVMEM_CONFIG_FIELD(c.rope_theta, PositiveNumber(j, "rope_theta", 10000.0));
  KVMEM_CONFIG_FIELD(c.tie_word_embeddings, Bool(j, "tie_word_embeddings", false));
  KVMEM_CONFIG_FIELD(c.attention_bias, Bool(j, "attention_bias", false));
  KVMEM_CONFIG_FIELD(c.mlp_bias, Bool(j, "mlp_bias", false));

  auto sw = j.find("sliding_window");
  if (sw != j.end() && !sw->is_null()) {
    if (!sw->is_number_integer() || sw->get<int64_t>() <= 0) {
      return BadField("sliding_window", "must be a positive integer or null");
    }
    c.sliding_window = static_cast<int>(std::min<int64_t>(sw->get<int64_t>(), 1 << 30));
  }

  auto bos = j.find("bos_token_id");
  if (bos != j.end() && bos->is_number_integer()) c.bos_token_id = bos->get<int>();
  auto eos = j.find("eos_token_id");
  if (eos != j.end() && !eos->is_null()) {
    c.eos_token_ids.clear();
    if (eos->is_number_integer()) {
      c.eos_token_ids.push_back(eos->get<int>());
    } else if (eos->is_array()) {
      for (const Json& e : *eos) {
        if (!e.is_number_integer()) return BadField("eos_token_id", "must hold integers");
        c.eos_token_ids.push_back(e.get<int>());
      }
    } else {
      return BadField("eos_token_id", "must be an integer or a list of integers");
    }
  }

  auto rs = j.find("rope_scaling");
  if (rs != j.end() && !rs->is_null()) {
    if (!rs->is_object()) return BadField("rope_scaling", "must be an object or null");
    std::string type;
    if (rs->contains("rope_type") && (*rs)["rope_type"].is_string()) {
      type = (*rs)["rope_type"].get<std::string>();
    } else if (rs->contains("type") && (*rs)["type"].is_string()) {
      type = (*rs)["type"].get<std::string>();
    }
    RopeScaling& s = c.rope_scaling;
    KVMEM_CONFIG_FIELD(s.factor, PositiveNumber(*rs, "factor", 1.0));
    if (type == "default") {
      s.type = RopeScaling::Type::kNone;
    } else if (type == "linear") {
      s.type = RopeScaling::Type::kLinear;
    } else if (type == "llama3") {
      s.type = RopeScaling::Type::kLlama3;
      KVMEM_CONFIG_FIELD(s.low_freq_factor, PositiveNumber(*rs, "low_freq_factor", 1.0));
      KVMEM_CONFIG_FIELD(s.high_freq_factor, PositiveNumber(*rs, "high_freq_factor", 4.0));
      KVMEM_CONFIG_FIELD(s.original_max_position_embeddings,
                         PositiveInt(*rs, "original_max_position_embeddings", 8192));
      if (s.high_freq_factor <= s.low_freq_factor) {
        return BadField("rope_scaling", "needs high_freq_factor > low_freq_factor");
      }
    } else {
      return absl::FailedPreconditionError(absl::StrCat(
          "unsupported rope_scaling type \"", type, "\": kvmem supports linear and llama3"));
    }
  }
  return c;
}

std::vector<double> ModelConfig::RopeInverseFrequencies() const {
  const int half = head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = 1.0 / std::pow(rope_theta, (2.0 * i) / head_dim);
  }
  const RopeScaling& s = rope_scaling;
  if (s.type == RopeScaling::Type::kLinear) {
    for (double& f : inv) f /= s.factor;
  } else if (s.type == RopeScaling::Type::kLlama3) {
    const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
  }
  return inv;
}

}  // namespace kvmem
