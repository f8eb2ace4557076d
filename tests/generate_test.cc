// Generation on the real stories260K model, through the library and through `kvmem complete`.
#include "engine/generate.h"

#include <cstdio>
#include <memory>
#include <string>

#include "engine/cpu_backend.h"
#include "gtest/gtest.h"

namespace kvmem {
namespace {

class GenerateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() { delete model_; }

  GenerationResult Run(const std::string& prompt, const SamplingParams& params,
                       std::string* streamed = nullptr) {
    CpuBackend backend(*model_, {.threads = 2});
    auto result = Complete(*model_, backend, prompt, params, [&](std::string_view delta) {
      if (streamed) streamed->append(delta);
      return true;
    });
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : GenerationResult{};
  }

  static Model* model_;
};
Model* GenerateTest::model_ = nullptr;

constexpr char kExpected[] =
    ", there was a little girl named Lily. She loved to play outside in the park.";

TEST_F(GenerateTest, GreedyStoriesContinuationMatchesIndependentReference) {
  std::string streamed;
  GenerationResult r = Run("Once upon a time", {.max_tokens = 40}, &streamed);
  EXPECT_EQ(r.text.rfind(kExpected, 0), 0u) << r.text;
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.tokens.size(), 40u);
  EXPECT_EQ(r.finish, FinishReason::kLength);
}

TEST_F(GenerateTest, StopStringEndsGenerationBeforeIt) {
  std::string streamed;
  SamplingParams params{.max_tokens = 60};
  params.stop = {" Lily"};
  GenerationResult r = Run("Once upon a time", params, &streamed);
  EXPECT_EQ(r.finish, FinishReason::kStop);
  EXPECT_EQ(r.text, ", there was a little girl named");
  EXPECT_EQ(streamed, r.text);  // nothing of the stop string leaked into the stream
}

TEST_F(GenerateTest, SeededSamplingIsReproducible) {
  SamplingParams params{.temperature = 1.0f, .top_p = 0.95f, .seed = 1234, .max_tokens = 30};
  GenerationResult a = Run("Once upon a time", params);
  GenerationResult b = Run("Once upon a time", params);
  EXPECT_EQ(a.tokens, b.tokens);
  params.seed = 99;
  GenerationResult c = Run("Once upon a time", params);
  EXPECT_NE(a.tokens, c.tokens);
}

TEST_F(GenerateTest, CancellingFromTheCallbackStopsPromptly) {
  CpuBackend backend(*model_, {.threads = 1});
  int calls = 0;
  auto r = Complete(*model_, backend, "Once upon a time", {.max_tokens = 100},
                    [&](std::string_view) { return ++calls < 3; });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish, FinishReason::kCancelled);
  EXPECT_EQ(calls, 3);
  EXPECT_LT(r->tokens.size(), 10u);
}

TEST_F(GenerateTest, InvalidSamplingIsRejected) {
  CpuBackend backend(*model_, {.threads = 1});
  auto r = Complete(*model_, backend, "x", {.top_p = 2.0f}, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

class FakeTokenizer : public Tokenizer {
 public:
  // id i decodes to pieces_[i]; a sequence decodes to the concatenation.
  explicit FakeTokenizer(std::vector<std::string> pieces) : pieces_(std::move(pieces)) {}
  bool Encode(std::string_view, std::vector<int>*, std::string*) const override { return false; }
  std::string Decode(const std::vector<int>& ids) const override {
    std::string s;
    for (int id : ids) s += pieces_[id];
    return s;
  }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  int bos_id() const override { return -1; }
  int eos_id() const override { return -1; }
  int PieceToId(std::string_view) const override { return -1; }
  const std::string& serialized_model() const override { return empty_; }

 private:
  std::vector<std::string> pieces_;
  std::string empty_;
};

TEST(TextStreamTest, HoldsBackPossibleStopPrefixAndIncompleteUtf8) {
  FakeTokenizer tok({"ab", "c", "EN", "D", "\xE2\x82", "\xAC", "x"});
  TextStream stream(tok, {}, {"END"});
  bool stopped = false;
  // Up to two bytes ("EN") are held back: they could be the start of "END".
  EXPECT_EQ(stream.Push(0, &stopped), "");
  EXPECT_EQ(stream.Push(1, &stopped), "a");
  EXPECT_EQ(stream.Push(2, &stopped), "bc");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(stream.Push(3, &stopped), "");
  EXPECT_TRUE(stopped);
  EXPECT_EQ(stream.text(), "abc");
  EXPECT_EQ(stream.Flush(), "");
}

TEST(TextStreamTest, EmitsWholeUtf8CharactersOnly) {
  // Decoding a lone lead byte yields U+FFFD in sentencepiece; the fake yields raw bytes,
  // so the stream must not cut inside the character either way.
  FakeTokenizer tok({"\xE2\x82", "\xAC", "x"});
  TextStream stream(tok, {}, {});
  bool stopped = false;
  std::string out = stream.Push(0, &stopped);
  out += stream.Push(1, &stopped);
  out += stream.Push(2, &stopped);
  out += stream.Flush();
  EXPECT_EQ(out, "\xE2\x82\xAC" "x");
}

TEST(KvmemCliTest, CompletePrintsOnlyTheContinuation) {
  const std::string cmd = std::string(KVMEM_BIN_DIR) +
                          "/kvmem complete --model " KVMEM_TEST_MODEL_DIR
                          " --prompt 'Once upon a time' --max-tokens 20 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof(buf), pipe)) out.append(buf, n);
  EXPECT_EQ(pclose(pipe), 0) << out;
  EXPECT_EQ(out.rfind(", there was a little girl named Lily.", 0), 0u) << out;
}

TEST(KvmemCliTest, BadModelDirectoryIsAClearError) {
  const std::string cmd = std::string(KVMEM_BIN_DIR) +
                          "/kvmem complete --model /nonexistent/model --prompt hi 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof(buf), pipe)) out.append(buf, n);
  EXPECT_NE(pclose(pipe), 0);
  EXPECT_NE(out.find("NOT_FOUND"), std::string::npos) << out;
  EXPECT_NE(out.find("/nonexistent/model"), std::string::npos) << out;
}

}  // namespace
}  // namespace kvmem
