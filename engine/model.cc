#include "engine/model.h"

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvmem {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// Which safetensors files hold the weights, in a stable order.
absl::StatusOr<std::vector<std::string>> WeightFiles(const std::string& dir) {
  std::vector<std::string> files;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (fs::exists(index_path)) {
    KVMEM_ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
    nlohmann::json index = nlohmann::json::parse(text, nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, " is malformed: expected an object with \"weight_map\""));
    }
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry for ", tensor, " is not a file name"));
      }
      files.push_back(dir + "/" + file.get<std::string>());
    }
  } else {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  if (files.empty()) {
    return absl::NotFoundError(absl::StrCat("no *.safetensors weights in ", dir));
  }
  return files;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelLoadOptions& options) {
  if (!fs::is_directory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  }
  auto model = std::unique_ptr<Model>(new Model());
  model->dir_ = dir;
  auto config_text = ReadFile(dir + "/config.json");
  if (!config_text.ok()) {
    return absl::NotFoundError(absl::StrCat("no config.json in model directory ", dir));
  }
  KVMEM_ASSIGN_OR_RETURN(model->config_, ModelConfig::FromJson(*config_text));
  KVMEM_ASSIGN_OR_RETURN(std::vector<std::string> files, WeightFiles(dir));
  KVMEM_RETURN_IF_ERROR(model->LoadWeights(files));

  const std::string tokenizer_path = dir + "/tokenizer.model";
  if (fs::exists(tokenizer_path)) {
    std::string error;
    model->tokenizer_ = Tokenizer::LoadSentencePiece(tokenizer_path, &error);
    if (model->tokenizer_ == nullptr) return absl::InvalidArgumentError(error);
    if (model->tokenizer_->vocab_size() > model->config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer.model has ", model->tokenizer_->vocab_size(),
          " pieces but the model's vocab_size is ", model->config_.vocab_size));
    }
  } else if (options.require_tokenizer) {
    return absl::NotFoundError(absl::StrCat(
        "no tokenizer.model in ", dir, ": kvmem needs the model's sentencepiece tokenizer"));
  }
  model->ComputeFingerprint(*config_text);
  return model;
}

absl::Status Model::LoadWeights(const std::vector<std::string>& files) {
  for (const std::string& path : files) {
    KVMEM_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    for (const auto& [name, view] : file->tensors()) tensor_index_[name] = &view;
    files_.push_back(std::move(file));
  }
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, inter = c.intermediate_size, q = c.q_dim(), kv = c.kv_dim();
  ModelWeights& w = weights_;
  KVMEM_ASSIGN_OR_RETURN(w.embed, Tensor("model.embed_tokens.weight", {c.vocab_size, h}));
  KVMEM_ASSIGN_OR_RETURN(w.final_norm, Tensor("model.norm.weight", {h}));
  if (c.tie_word_embeddings && tensor_index_.count("lm_head.weight") == 0) {
    w.lm_head = w.embed;
  } else {
    KVMEM_ASSIGN_OR_RETURN(w.lm_head, Tensor("lm_head.weight", {c.vocab_size, h}));
  }
  w.layers.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    KVMEM_ASSIGN_OR_RETURN(lw.attn_norm, Tensor(p + "input_layernorm.weight", {h}));
    KVMEM_ASSIGN_OR_RETURN(lw.wq, Tensor(p + "self_attn.q_proj.weight", {q, h}));
    KVMEM_ASSIGN_OR_RETURN(lw.wk, Tensor(p + "self_attn.k_proj.weight", {kv, h}));
    KVMEM_ASSIGN_OR_RETURN(lw.wv, Tensor(p + "self_attn.v_proj.weight", {kv, h}));
    KVMEM_ASSIGN_OR_RETURN(lw.wo, Tensor(p + "self_attn.o_proj.weight", {h, q}));
    KVMEM_ASSIGN_OR_RETURN(lw.bq, OptionalTensor(p + "self_attn.q_proj.bias", ab, {q}));
    KVMEM_ASSIGN_OR_RETURN(lw.bk, OptionalTensor(p + "self_attn.k_proj.bias", ab, {kv}));
    KVMEM_ASSIGN_OR_RETURN(lw.bv, OptionalTensor(p + "self_attn.v_proj.bias", ab, {kv}));
    KVMEM_ASSIGN_OR_RETURN(lw.bo, OptionalTensor(p + "self_attn.o_proj.bias", ab, {h}));
    KVMEM_ASSIGN_OR_RETURN(lw.mlp_norm, Tensor(p + "post_attention_layernorm.weight", {h}));
    KVMEM_ASSIGN_OR_RETURN(lw.w_gate, Tensor(p + "mlp.gate_proj.weight", {inter, h}));
    KVMEM_ASSIGN_OR_RETURN(lw.w_up, Tensor(p + "mlp.up_proj.weight", {inter, h}));
    KVMEM_ASSIGN_OR_RETURN(lw.w_down, Tensor(p + "mlp.down_proj.weight", {h, inter}));
    KVMEM_ASSIGN_OR_RETURN(lw.b_gate, OptionalTensor(p + "mlp.gate_proj.bias", mb, {inter}));
    KVMEM_ASSIGN_OR_RETURN(lw.b_up, OptionalTensor(p + "mlp.up_proj.bias", mb, {inter}));
    KVMEM_ASSIGN_OR_RETURN(lw.b_down, OptionalTensor(p + "mlp.down_proj.bias", mb, {h}));
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> Model::Tensor(const std::string& name, std::vector<int64_t> shape) {
  auto it = tensor_index_.find(name);
  if (it == tensor_index_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model in ", dir_, " lacks tensor ", name));
  }
  const TensorView& t = *it->second;
  if (t.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has shape ",
                                                   t.ShapeString(), ", config.json implies ",
                                                   ShapeString(shape)));
  }
  if (t.dtype == DType::kF32 && reinterpret_cast<uintptr_t>(t.data) % alignof(float) == 0) {
    return reinterpret_cast<const float*>(t.data);  // zero-copy from the mapping
  }
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has dtype ",
                                                   DTypeName(t.dtype),
                                                   "; kvmem loads F32, F16 and BF16 weights"));
  }
  std::vector<float>& copy = converted_.emplace_back(static_cast<size_t>(t.NumElements()));
  KVMEM_RETURN_IF_ERROR(ConvertToFloat32(t, copy.data()));
  return copy.data();
}

absl::StatusOr<const float*> Model::OptionalTensor(const std::string& name, bool present,
                                                   std::vector<int64_t> shape) {
  if (!present) return nullptr;
  return Tensor(name, std::move(shape));
}

namespace {

// SHA-256 of `n` bytes into out[32].
void Sha256(const void* data, size_t n, unsigned char* out) {
  unsigned int len = 0;
  KVMEM_CHECK(EVP_Digest(data, n, out, &len, EVP_sha256(), nullptr) == 1 && len == 32);
}

}  // namespace

void Model::ComputeFingerprint(const std::string& config_text) {
  // Every byte of every tensor counts: weights that differ anywhere (a patched or corrupted
  // tensor, a fine-tune with the same shapes) must never share a fingerprint. Tensors are
  // hashed in parallel, then their digests are hashed in name order with everything else.
  std::vector<const TensorView*> tensors;
  for (const auto& [name, view] : tensor_index_) tensors.push_back(view);
  std::vector<unsigned char> digests(tensors.size() * 32);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tensors.size();) {
      Sha256(tensors[i]->data, tensors[i]->nbytes, &digests[i * 32]);
    }
  };
  const unsigned threads = std::clamp(std::thread::hardware_concurrency(), 1u, 16u);
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();

  std::string message = "kvmem-model-fingerprint-v1";
  message += config_text;
  for (const auto& file : files_) message += file->header();
  for (size_t i = 0; i < tensors.size(); ++i) {
    message += tensors[i]->name;
    message.append(reinterpret_cast<const char*>(&digests[i * 32]), 32);
  }
  if (tokenizer_ != nullptr) message += tokenizer_->serialized_model();
  unsigned char digest[32];
  Sha256(message.data(), message.size(), digest);
  static const char kHex[] = "0123456789abcdef";
  fingerprint_.clear();
  for (int i = 0; i < 16; ++i) {
    fingerprint_.push_back(kHex[digest[i] >> 4]);
    fingerprint_.push_back(kHex[digest[i] & 15]);
  }
}

std::unique_ptr<Model> Model::Shaped(const ModelConfig& config,
                                     std::unique_ptr<Tokenizer> tokenizer) {
  std::unique_ptr<Model> m(new Model());
  m->config_ = config;
  m->tokenizer_ = std::move(tokenizer);
  m->ComputeFingerprint(absl::StrCat("shaped ", config.architecture, " ", config.hidden_size, " ",
                                     config.intermediate_size, " ", config.num_layers, " ",
                                     config.num_heads, " ", config.num_kv_heads, " ",
                                     config.head_dim, " ", config.vocab_size));
  return m;
}

bool Model::IsEos(int token) const {
  const auto& eos = config_.eos_token_ids;
  return std::find(eos.begin(), eos.end(), token) != eos.end();
}

absl::StatusOr<std::string> ResolveModelDir(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("KVMEM_MODEL"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  const std::string bundled = std::string(KVMEM_SOURCE_DIR) + "/../shared/models/stories260K";
  if (fs::is_directory(bundled)) return fs::weakly_canonical(bundled).string();
  return absl::NotFoundError(
      "no model given: pass --model DIR (a Hugging Face Llama directory with config.json, "
      "*.safetensors and tokenizer.model) or set KVMEM_MODEL");
}

}  // namespace kvmem
