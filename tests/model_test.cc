// Model loading: config, weights, sharding, tokenizer, fingerprint, and every load error.
#include "engine/model.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "engine/model_config.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace kvmem {
namespace {

namespace fs = std::filesystem;
using testing::ConfigJson;
using testing::RandomModelSpec;
using testing::RandomTensors;
using testing::TempDir;
using testing::WriteRandomModel;
using testing::WriteText;

constexpr char kStoriesDir[] = KVMEM_TEST_MODEL_DIR;

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return haystack.find(needle) != absl::string_view::npos;
}

// Expects `result` to have failed with `code` and a message containing every one of `parts`.
template <typename T>
void ExpectError(const absl::StatusOr<T>& result, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  ASSERT_FALSE(result.ok()) << "loaded, expected " << absl::StatusCodeToString(code);
  EXPECT_EQ(result.status().code(), code) << result.status();
  for (const std::string& part : parts) {
    EXPECT_TRUE(Contains(result.status().message(), part))
        << "wanted \"" << part << "\" in: " << result.status();
  }
}

const ModelLoadOptions kNoTokenizer = {.require_tokenizer = false};

// Every weight array of a model with `config`, named, with its element count.
std::vector<std::pair<std::string, std::pair<const float*, size_t>>> AllWeights(
    const ModelWeights& w, const ModelConfig& c) {
  const size_t h = c.hidden_size, inter = c.intermediate_size, q = c.q_dim(), kv = c.kv_dim();
  std::vector<std::pair<std::string, std::pair<const float*, size_t>>> out = {
      {"embed", {w.embed, c.vocab_size * h}},
      {"final_norm", {w.final_norm, h}},
      {"lm_head", {w.lm_head, c.vocab_size * h}},
  };
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& lw = w.layers[l];
    const std::string p = "layer" + std::to_string(l) + ".";
    out.push_back({p + "attn_norm", {lw.attn_norm, h}});
    out.push_back({p + "wq", {lw.wq, q * h}});
    out.push_back({p + "wk", {lw.wk, kv * h}});
    out.push_back({p + "wv", {lw.wv, kv * h}});
    out.push_back({p + "wo", {lw.wo, h * q}});
    out.push_back({p + "mlp_norm", {lw.mlp_norm, h}});
    out.push_back({p + "w_gate", {lw.w_gate, inter * h}});
    out.push_back({p + "w_up", {lw.w_up, inter * h}});
    out.push_back({p + "w_down", {lw.w_down, h * inter}});
  }
  return out;
}

void ExpectSameWeights(const Model& a, const Model& b) {
  auto wa = AllWeights(a.weights(), a.config());
  auto wb = AllWeights(b.weights(), b.config());
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    const auto& [name, span] = wa[i];
    ASSERT_NE(span.first, nullptr) << name;
    ASSERT_NE(wb[i].second.first, nullptr) << name;
    ASSERT_EQ(span.second, wb[i].second.second) << name;
    EXPECT_EQ(std::memcmp(span.first, wb[i].second.first, span.second * sizeof(float)), 0) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// The bundled stories260K model.

TEST(StoriesModelTest, LoadsConfig) {
  auto model = Model::Load(kStoriesDir);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.group_size(), 2);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{2});
  EXPECT_TRUE((*model)->IsEos(2));
  EXPECT_FALSE((*model)->IsEos(1));
  EXPECT_EQ((*model)->dir(), kStoriesDir);
}

TEST(StoriesModelTest, TiedEmbeddingsShareTheEmbeddingTable) {
  auto model = Model::Load(kStoriesDir);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelWeights& w = (*model)->weights();
  ASSERT_NE(w.embed, nullptr);
  EXPECT_EQ(w.lm_head, w.embed);
  ASSERT_EQ(w.layers.size(), 5u);
  for (const LayerWeights& lw : w.layers) {
    EXPECT_NE(lw.wq, nullptr);
    EXPECT_NE(lw.w_down, nullptr);
    EXPECT_EQ(lw.bq, nullptr);  // no attention bias
    EXPECT_EQ(lw.b_gate, nullptr);
  }
  // The weights are the file's values.
  auto file = SafetensorsFile::Open(std::string(kStoriesDir) + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, ptr] :
       {std::pair{"model.embed_tokens.weight", w.embed},
        std::pair{"model.layers.3.mlp.down_proj.weight", w.layers[3].w_down},
        std::pair{"model.layers.0.self_attn.k_proj.weight", w.layers[0].wk}}) {
    const TensorView* t = (*file)->Find(name);
    ASSERT_NE(t, nullptr) << name;
    std::vector<float> want(t->NumElements());
    ASSERT_TRUE(ConvertToFloat32(*t, want.data()).ok());
    EXPECT_EQ(std::vector<float>(ptr, ptr + want.size()), want) << name;
  }
}

TEST(StoriesModelTest, LoadsTokenizer) {
  auto model = Model::Load(kStoriesDir);
  ASSERT_TRUE(model.ok()) << model.status();
  const Tokenizer* tok = (*model)->tokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->vocab_size(), 512);
  std::vector<int> ids;
  std::string error;
  ASSERT_TRUE(tok->Encode("Once upon a time", &ids, &error)) << error;
  EXPECT_FALSE(ids.empty());
  EXPECT_EQ(tok->Decode(ids), "Once upon a time");
}

TEST(StoriesModelTest, FingerprintIsStable32HexDigits) {
  auto a = Model::Load(kStoriesDir);
  auto b = Model::Load(kStoriesDir);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(std::regex_match((*a)->fingerprint(), std::regex("[0-9a-f]{32}")))
      << (*a)->fingerprint();
  EXPECT_EQ((*a)->fingerprint(), (*b)->fingerprint());
}

TEST(StoriesModelTest, ShapedModelHasTheShapeAndTokenizerButNoWeights) {
  auto stories = Model::Load(kStoriesDir);
  ASSERT_TRUE(stories.ok()) << stories.status();
  std::string error;
  auto tokenizer =
      Tokenizer::LoadSentencePiece(std::string(kStoriesDir) + "/tokenizer.model", &error);
  ASSERT_NE(tokenizer, nullptr) << error;
  ModelConfig wide = (*stories)->config();
  wide.hidden_size *= 2;
  auto a = Model::Shaped((*stories)->config(), std::move(tokenizer));
  tokenizer = Tokenizer::LoadSentencePiece(std::string(kStoriesDir) + "/tokenizer.model", &error);
  auto b = Model::Shaped(wide, std::move(tokenizer));
  EXPECT_EQ(a->config().hidden_size, (*stories)->config().hidden_size);
  EXPECT_EQ(b->config().hidden_size, 2 * (*stories)->config().hidden_size);
  ASSERT_NE(a->tokenizer(), nullptr);
  EXPECT_EQ(a->tokenizer()->vocab_size(), 512);
  EXPECT_TRUE(a->weights().layers.empty());
  EXPECT_EQ(a->weights().embed, nullptr);
  EXPECT_TRUE(std::regex_match(a->fingerprint(), std::regex("[0-9a-f]{32}")));
  // Never the fingerprint of real weights, and different shapes differ.
  EXPECT_NE(a->fingerprint(), (*stories)->fingerprint());
  EXPECT_NE(a->fingerprint(), b->fingerprint());
}

// ---------------------------------------------------------------------------------------------
// Random models written to temporary directories.

class ModelLoadTest : public ::testing::Test {
 protected:
  std::string dir() const { return dir_.path(); }
  absl::StatusOr<std::unique_ptr<Model>> Load(const ModelLoadOptions& options = kNoTokenizer) {
    return Model::Load(dir(), options);
  }
  // Writes config.json from `config` and model.safetensors from `tensors`.
  void Write(const nlohmann::json& config, const std::vector<TensorToWrite>& tensors) {
    WriteText(dir() + "/config.json", config.dump(2));
    absl::Status status = WriteSafetensors(dir() + "/model.safetensors", tensors);
    ASSERT_TRUE(status.ok()) << status;
  }
  void WriteConfig(const nlohmann::json& config) {
    WriteText(dir() + "/config.json", config.dump(2));
  }

  TempDir dir_;
  RandomModelSpec spec_;
};

TEST_F(ModelLoadTest, LoadsRandomModelWithoutTokenizerWhenNotRequired) {
  WriteRandomModel(dir(), spec_);
  auto model = Load();
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->tokenizer(), nullptr);
  EXPECT_EQ((*model)->config().hidden_size, spec_.hidden);
  EXPECT_EQ((*model)->config().kv_dim(), spec_.kv_heads * spec_.head_dim);
  EXPECT_NE((*model)->weights().lm_head, (*model)->weights().embed);  // untied
  EXPECT_TRUE(std::regex_match((*model)->fingerprint(), std::regex("[0-9a-f]{32}")));
}

TEST_F(ModelLoadTest, MissingTokenizerIsNotFoundByDefault) {
  WriteRandomModel(dir(), spec_);
  ExpectError(Model::Load(dir()), absl::StatusCode::kNotFound, {"tokenizer.model", dir()});
}

TEST_F(ModelLoadTest, CorruptTokenizerIsInvalidArgument) {
  WriteRandomModel(dir(), spec_);
  WriteText(dir() + "/tokenizer.model", "this is not a sentencepiece model proto \xff\xfe\x01");
  auto model = Model::Load(dir());
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << model.status();
  EXPECT_FALSE(model.status().message().empty());
  // A corrupt tokenizer is an error even when none is required.
  EXPECT_EQ(Load().status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelLoadTest, TokenizerLargerThanVocabIsInvalidArgument) {
  WriteRandomModel(dir(), spec_);  // vocab 64 < the tokenizer's 512 pieces
  fs::copy_file(std::string(kStoriesDir) + "/tokenizer.model", dir() + "/tokenizer.model");
  ExpectError(Model::Load(dir()), absl::StatusCode::kInvalidArgument, {"512", "64"});
}

TEST_F(ModelLoadTest, HalfPrecisionWeightsAreConvertedToFloat) {
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    TempDir d;
    spec_.dtype = dtype;
    WriteRandomModel(d.path(), spec_);
    auto model = Model::Load(d.path(), kNoTokenizer);
    ASSERT_TRUE(model.ok()) << model.status();
    auto file = SafetensorsFile::Open(d.path() + "/model.safetensors");
    ASSERT_TRUE(file.ok());
    const TensorView* t = (*file)->Find("model.layers.1.mlp.gate_proj.weight");
    ASSERT_NE(t, nullptr);
    const float* got = (*model)->weights().layers[1].w_gate;
    for (int64_t i = 0; i < t->NumElements(); ++i) {
      uint16_t raw;
      std::memcpy(&raw, t->data + 2 * i, 2);
      const float want = dtype == DType::kF16 ? HalfToFloat(raw) : BFloat16ToFloat(raw);
      ASSERT_EQ(got[i], want) << DTypeName(dtype) << " element " << i;
    }
  }
}

TEST_F(ModelLoadTest, LoadsBiasesWhenConfigured) {
  spec_.attention_bias = true;
  spec_.mlp_bias = true;
  WriteRandomModel(dir(), spec_);
  auto model = Load();
  ASSERT_TRUE(model.ok()) << model.status();
  for (const LayerWeights& lw : (*model)->weights().layers) {
    EXPECT_NE(lw.bq, nullptr);
    EXPECT_NE(lw.bo, nullptr);
    EXPECT_NE(lw.b_down, nullptr);
  }
}

// --- Fingerprint -----------------------------------------------------------------------------

// Copies the model in `from` to `to`, with the byte at `offset` into tensor `name`'s data
// flipped.
void CopyWithFlippedByte(const std::string& from, const std::string& to, const std::string& name,
                         size_t offset) {
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  size_t file_offset;
  {
    auto file = SafetensorsFile::Open(to + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    const TensorView* t = (*file)->Find(name);
    ASSERT_NE(t, nullptr) << name;
    ASSERT_LT(offset, t->nbytes);
    const uint8_t* file_start = reinterpret_cast<const uint8_t*>((*file)->header().data()) - 8;
    file_offset = static_cast<size_t>(t->data - file_start) + offset;
  }
  std::fstream f(to + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(file_offset));
  char byte;
  f.read(&byte, 1);
  byte ^= 0x01;
  f.seekp(static_cast<std::streamoff>(file_offset));
  f.write(&byte, 1);
  ASSERT_TRUE(f.good());
}

TEST_F(ModelLoadTest, FingerprintChangesWhenAnyWeightByteChanges) {
  spec_.vocab = 512;
  spec_.hidden = 64;  // embed is 128 KiB: large enough that sampling it would miss bytes
  WriteRandomModel(dir(), spec_);
  auto base = Load();
  ASSERT_TRUE(base.ok()) << base.status();
  const std::string embed = "model.embed_tokens.weight";
  const size_t embed_bytes = size_t{512} * 64 * 4;
  struct Flip {
    std::string tensor;
    size_t offset;
  };
  const std::vector<Flip> flips = {
      {embed, 0},
      {embed, embed_bytes / 2},
      {embed, embed_bytes / 2 + 1001},
      {embed, embed_bytes / 3 + 7},
      {embed, embed_bytes - 1},
      {"model.layers.1.mlp.down_proj.weight", 64 * 48 * 4 / 2 + 3},
      {"model.norm.weight", 5},
  };
  for (const Flip& flip : flips) {
    TempDir copy;
    CopyWithFlippedByte(dir(), copy.path(), flip.tensor, flip.offset);
    auto changed = Model::Load(copy.path(), kNoTokenizer);
    ASSERT_TRUE(changed.ok()) << changed.status();
    EXPECT_NE((*changed)->fingerprint(), (*base)->fingerprint())
        << flip.tensor << " byte " << flip.offset;
  }
  // An untouched copy keeps the fingerprint: it depends on content, not on the path.
  TempDir same;
  fs::copy(dir(), same.path(), fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  auto copy = Model::Load(same.path(), kNoTokenizer);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->fingerprint(), (*base)->fingerprint());
}

TEST_F(ModelLoadTest, FingerprintChangesWithConfigAndTokenizer) {
  WriteRandomModel(dir(), spec_);
  auto base = Load();
  ASSERT_TRUE(base.ok()) << base.status();

  TempDir eps;
  WriteRandomModel(eps.path(), spec_);
  nlohmann::json config = ConfigJson(spec_);
  config["rms_norm_eps"] = 1e-6;
  WriteText(eps.path() + "/config.json", config.dump(2));
  auto eps_model = Model::Load(eps.path(), kNoTokenizer);
  ASSERT_TRUE(eps_model.ok()) << eps_model.status();
  EXPECT_NE((*eps_model)->fingerprint(), (*base)->fingerprint());

  TempDir stories_copy;
  fs::copy(kStoriesDir, stories_copy.path(), fs::copy_options::recursive);
  auto stories = Model::Load(kStoriesDir);
  ASSERT_TRUE(stories.ok()) << stories.status();
  fs::remove(stories_copy.path() + "/tokenizer.model");
  auto without_tokenizer = Model::Load(stories_copy.path(), kNoTokenizer);
  ASSERT_TRUE(without_tokenizer.ok()) << without_tokenizer.status();
  EXPECT_NE((*without_tokenizer)->fingerprint(), (*stories)->fingerprint());
}

// --- Sharded weights -------------------------------------------------------------------------

// Writes `spec`'s tensors into `dir` as two shards; with `index`, also the index json.
void WriteShardedModel(const std::string& dir, const RandomModelSpec& spec, bool index) {
  WriteText(dir + "/config.json", ConfigJson(spec).dump(2));
  std::vector<TensorToWrite> tensors = RandomTensors(spec);
  const size_t half = tensors.size() / 2;
  std::vector<TensorToWrite> first(tensors.begin(), tensors.begin() + half);
  std::vector<TensorToWrite> second(tensors.begin() + half, tensors.end());
  const std::string names[2] = {"model-00001-of-00002.safetensors",
                                "model-00002-of-00002.safetensors"};
  ASSERT_TRUE(WriteSafetensors(dir + "/" + names[0], first).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/" + names[1], second).ok());
  if (!index) return;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < tensors.size(); ++i) weight_map[tensors[i].name] = names[i < half ? 0 : 1];
  nlohmann::json json = {{"metadata", {{"total_size", 12345}}}, {"weight_map", weight_map}};
  WriteText(dir + "/model.safetensors.index.json", json.dump(2));
}

TEST_F(ModelLoadTest, ShardedModelLoadsTheSameWeightsAsOneFile) {
  WriteRandomModel(dir(), spec_);
  auto single = Load();
  ASSERT_TRUE(single.ok()) << single.status();
  for (bool index : {true, false}) {
    TempDir sharded;
    WriteShardedModel(sharded.path(), spec_, index);
    auto model = Model::Load(sharded.path(), kNoTokenizer);
    ASSERT_TRUE(model.ok()) << "index " << index << ": " << model.status();
    ExpectSameWeights(**single, **model);
    EXPECT_TRUE(std::regex_match((*model)->fingerprint(), std::regex("[0-9a-f]{32}")));
  }
}

TEST_F(ModelLoadTest, ShardedModelMissingATensorNamesIt) {
  WriteShardedModel(dir(), spec_, /*index=*/true);
  // Drop the second shard's tensors by rewriting it empty.
  ASSERT_TRUE(WriteSafetensors(dir() + "/model-00002-of-00002.safetensors", {}).ok());
  // The first shard holds embed, norm, lm_head and layer 0 up to its gate projection.
  ExpectError(Load(), absl::StatusCode::kInvalidArgument,
              {"lacks tensor model.layers.0.mlp.up_proj.weight"});
}

TEST_F(ModelLoadTest, IndexNamingAMissingShardIsNotFound) {
  WriteShardedModel(dir(), spec_, /*index=*/true);
  fs::remove(dir() + "/model-00002-of-00002.safetensors");
  ExpectError(Load(), absl::StatusCode::kNotFound, {"model-00002-of-00002.safetensors"});
}

TEST_F(ModelLoadTest, MalformedIndexIsInvalidArgument) {
  WriteShardedModel(dir(), spec_, /*index=*/true);
  const std::string index = dir() + "/model.safetensors.index.json";
  WriteText(index, "{\"weight_map\": ");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {index, "malformed"});
  WriteText(index, R"({"metadata": {}})");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {index, "weight_map"});
  WriteText(index, R"({"weight_map": ["model-00001-of-00002.safetensors"]})");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {index, "weight_map"});
  WriteText(index, R"({"weight_map": {"model.norm.weight": 7}})");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"model.norm.weight", "not a file name"});
  WriteText(index, R"({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"model.norm.weight", "not a file name"});
}

// --- Directory and config errors -------------------------------------------------------------

TEST_F(ModelLoadTest, MissingDirectoryIsNotFound) {
  const std::string missing = dir() + "/no-such-model";
  ExpectError(Model::Load(missing), absl::StatusCode::kNotFound, {missing, "does not exist"});
}

TEST_F(ModelLoadTest, MissingConfigIsNotFound) {
  ASSERT_TRUE(WriteSafetensors(dir() + "/model.safetensors", RandomTensors(spec_)).ok());
  ExpectError(Load(), absl::StatusCode::kNotFound, {"config.json", dir()});
}

TEST_F(ModelLoadTest, ConfigThatIsNotJsonIsInvalidArgument) {
  WriteRandomModel(dir(), spec_);
  WriteText(dir() + "/config.json", "{\"hidden_size\": 32,");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"config.json", "not valid JSON"});
  WriteText(dir() + "/config.json", "[1, 2]");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"config.json", "not a JSON object"});
}

TEST_F(ModelLoadTest, ConfigMissingARequiredFieldIsInvalidArgument) {
  WriteRandomModel(dir(), spec_);
  for (const char* field : {"hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "vocab_size", "architectures"}) {
    nlohmann::json config = ConfigJson(spec_);
    config.erase(field);
    WriteConfig(config);
    ExpectError(Load(), absl::StatusCode::kInvalidArgument,
                {std::string("\"") + field + "\"", "missing"});
  }
}

TEST_F(ModelLoadTest, ConfigWithNonPositiveValuesIsInvalidArgument) {
  WriteRandomModel(dir(), spec_);
  struct Case {
    const char* field;
    nlohmann::json value;
  };
  for (const Case& c :
       {Case{"hidden_size", 0}, Case{"num_hidden_layers", -1}, Case{"num_attention_heads", 0},
        Case{"num_key_value_heads", -2}, Case{"vocab_size", 0}, Case{"intermediate_size", 1.5},
        Case{"head_dim", -8}, Case{"rms_norm_eps", 0.0}, Case{"rope_theta", -10000.0},
        Case{"max_position_embeddings", 0}}) {
    nlohmann::json config = ConfigJson(spec_);
    config[c.field] = c.value;
    WriteConfig(config);
    ExpectError(Load(), absl::StatusCode::kInvalidArgument,
                {std::string("\"") + c.field + "\"", "positive"});
  }
}

TEST_F(ModelLoadTest, InconsistentHeadCountsAreInvalidArgument) {
  WriteRandomModel(dir(), spec_);
  nlohmann::json config = ConfigJson(spec_);
  config["num_key_value_heads"] = 3;  // does not divide 4 heads
  WriteConfig(config);
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"num_key_value_heads"});
  config = ConfigJson(spec_);
  config["head_dim"] = 7;
  WriteConfig(config);
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"head_dim", "even"});
}

TEST_F(ModelLoadTest, UnsupportedArchitectureIsFailedPrecondition) {
  WriteRandomModel(dir(), spec_);
  nlohmann::json config = ConfigJson(spec_);
  config["architectures"] = {"GPT2LMHeadModel"};
  WriteConfig(config);
  ExpectError(Load(), absl::StatusCode::kFailedPrecondition, {"GPT2LMHeadModel"});
  config["architectures"] = {"MistralForCausalLM"};
  WriteConfig(config);
  EXPECT_TRUE(Load().ok());
}

TEST_F(ModelLoadTest, UnsupportedRopeScalingIsFailedPrecondition) {
  spec_.rope_scaling = {{"type", "yarn"}, {"factor", 4.0}};
  WriteRandomModel(dir(), spec_);
  ExpectError(Load(), absl::StatusCode::kFailedPrecondition, {"rope_scaling", "yarn"});
  spec_.rope_scaling = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  WriteConfig(ConfigJson(spec_));
  ExpectError(Load(), absl::StatusCode::kFailedPrecondition, {"rope_scaling", "dynamic"});
}

TEST_F(ModelLoadTest, NoSafetensorsIsNotFound) {
  WriteConfig(ConfigJson(spec_));
  WriteText(dir() + "/model.bin", "pytorch weights");
  ExpectError(Load(), absl::StatusCode::kNotFound, {"safetensors", dir()});
}

// --- Weight errors ---------------------------------------------------------------------------

TEST_F(ModelLoadTest, MissingTensorIsInvalidArgumentNamingIt) {
  for (const std::string& name :
       {std::string("model.layers.1.mlp.up_proj.weight"), std::string("model.embed_tokens.weight"),
        std::string("lm_head.weight"), std::string("model.norm.weight")}) {
    std::vector<TensorToWrite> tensors = RandomTensors(spec_);
    std::erase_if(tensors, [&](const TensorToWrite& t) { return t.name == name; });
    Write(ConfigJson(spec_), tensors);
    ExpectError(Load(), absl::StatusCode::kInvalidArgument, {name});
  }
}

TEST_F(ModelLoadTest, MissingBiasIsInvalidArgumentWhenConfigured) {
  std::vector<TensorToWrite> tensors = RandomTensors(spec_);  // written without biases
  RandomModelSpec with_bias = spec_;
  with_bias.attention_bias = true;
  Write(ConfigJson(with_bias), tensors);
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"model.layers.0.self_attn.q_proj.bias"});
}

TEST_F(ModelLoadTest, WrongShapeIsInvalidArgumentNamingTensorAndShapes) {
  std::vector<TensorToWrite> tensors = RandomTensors(spec_);
  const std::string name = "model.layers.1.self_attn.k_proj.weight";
  for (TensorToWrite& t : tensors) {
    if (t.name != name) continue;
    t.shape = {spec_.hidden, spec_.kv_heads * spec_.head_dim};  // transposed: [32, 16]
  }
  Write(ConfigJson(spec_), tensors);
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {name, "[32, 16]", "[16, 32]"});
}

TEST_F(ModelLoadTest, IntegerWeightIsInvalidArgument) {
  std::vector<TensorToWrite> tensors = RandomTensors(spec_);
  const std::string name = "model.layers.0.post_attention_layernorm.weight";
  for (TensorToWrite& t : tensors) {
    if (t.name == name) t.dtype = DType::kI32;  // same size as F32
  }
  Write(ConfigJson(spec_), tensors);
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {name, "I32"});
}

TEST_F(ModelLoadTest, MalformedSafetensorsIsInvalidArgument) {
  WriteConfig(ConfigJson(spec_));
  WriteText(dir() + "/model.safetensors", "short");
  ExpectError(Load(), absl::StatusCode::kInvalidArgument, {"model.safetensors"});
}

// ---------------------------------------------------------------------------------------------
// RoPE frequencies.

ModelConfig ConfigWithRope(const nlohmann::json& rope_scaling, int head_dim, double theta) {
  RandomModelSpec spec;
  spec.head_dim = head_dim;
  spec.rope_theta = theta;
  spec.rope_scaling = rope_scaling;
  auto config = ModelConfig::FromJson(ConfigJson(spec).dump());
  EXPECT_TRUE(config.ok()) << config.status();
  return config.value_or(ModelConfig());
}

TEST(RopeTest, UnscaledFrequenciesFollowTheta) {
  ModelConfig c = ConfigWithRope(nullptr, 16, 10000.0);
  std::vector<double> inv = c.RopeInverseFrequencies();
  ASSERT_EQ(inv.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(inv[i], std::pow(10000.0, -i / 8.0), 1e-15) << i;
  EXPECT_EQ(inv[0], 1.0);
}

TEST(RopeTest, LinearScalingDividesEveryFrequency) {
  ModelConfig c = ConfigWithRope({{"type", "linear"}, {"factor", 4.0}}, 16, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  std::vector<double> inv = c.RopeInverseFrequencies();
  ASSERT_EQ(inv.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(inv[i], std::pow(10000.0, -i / 8.0) / 4.0, 1e-15) << i;
  }
}

TEST(RopeTest, Llama3ScalingMatchesTheFormula) {
  // Every parameter differs from its default so a field read wrongly changes the result.
  const double factor = 16, low = 2, high = 8, original = 4096, theta = 500000;
  const int head_dim = 128;
  ModelConfig c = ConfigWithRope({{"rope_type", "llama3"},
                                  {"factor", factor},
                                  {"low_freq_factor", low},
                                  {"high_freq_factor", high},
                                  {"original_max_position_embeddings", 4096}},
                                 head_dim, theta);
  ASSERT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, factor);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, low);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, high);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);

  std::vector<double> inv = c.RopeInverseFrequencies();
  ASSERT_EQ(inv.size(), static_cast<size_t>(head_dim / 2));
  // Wavelengths shorter than original/high (512) keep their frequency, longer than
  // original/low (2048) are divided by factor, and in between they blend linearly in
  // original/wavelength.
  int kept = 0, divided = 0, blended = 0;
  for (int i = 0; i < head_dim / 2; ++i) {
    const double base = 1.0 / std::pow(theta, 2.0 * i / head_dim);
    const double wavelen = 2 * std::numbers::pi / base;
    double want;
    if (wavelen < original / high) {
      want = base;
      ++kept;
    } else if (wavelen > original / low) {
      want = base / factor;
      ++divided;
    } else {
      const double smooth = (original / wavelen - low) / (high - low);
      EXPECT_GE(smooth, 0.0);
      EXPECT_LE(smooth, 1.0);
      want = (1 - smooth) * base / factor + smooth * base;
      EXPECT_LT(want, base);
      EXPECT_GT(want, base / factor);
      ++blended;
    }
    EXPECT_NEAR(inv[i], want, 1e-12 * base) << "pair " << i << " wavelength " << wavelen;
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
  // Hand-checked anchors: pair 0 (wavelength 2 pi) is unscaled, the last one fully scaled.
  EXPECT_DOUBLE_EQ(inv[0], 1.0);
  EXPECT_NEAR(inv[63], std::pow(theta, -126.0 / 128) / 16, 1e-18);
}

TEST(RopeTest, Llama3DefaultsAndValidation) {
  ModelConfig c = ConfigWithRope({{"rope_type", "llama3"}, {"factor", 8.0}}, 16, 10000.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);

  RandomModelSpec spec;
  spec.rope_scaling = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 1.0}};
  ExpectError(ModelConfig::FromJson(ConfigJson(spec).dump()), absl::StatusCode::kInvalidArgument,
              {"rope_scaling"});
}

// ---------------------------------------------------------------------------------------------
// ResolveModelDir.

class ResolveModelDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* env = std::getenv("KVMEM_MODEL")) saved_ = env;
    ::unsetenv("KVMEM_MODEL");
  }
  void TearDown() override {
    if (saved_) {
      ::setenv("KVMEM_MODEL", saved_->c_str(), 1);
    } else {
      ::unsetenv("KVMEM_MODEL");
    }
  }
  std::optional<std::string> saved_;
};

TEST_F(ResolveModelDirTest, ExplicitFlagWins) {
  ::setenv("KVMEM_MODEL", "/from/env", 1);
  auto dir = ResolveModelDir("/from/flag");
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, "/from/flag");
}

TEST_F(ResolveModelDirTest, EnvironmentComesNext) {
  ::setenv("KVMEM_MODEL", "/from/env", 1);
  auto dir = ResolveModelDir("");
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, "/from/env");
}

TEST_F(ResolveModelDirTest, FallsBackToTheBundledModel) {
  auto dir = ResolveModelDir("");
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_TRUE(fs::equivalent(*dir, kStoriesDir)) << *dir;
  // An empty variable counts as unset.
  ::setenv("KVMEM_MODEL", "", 1);
  auto empty = ResolveModelDir("");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(fs::equivalent(*empty, kStoriesDir)) << *empty;
}

}  // namespace
}  // namespace kvmem
