// Durable sessions through the SessionManager: restarts, kill -9, crashes during commits,
// fingerprints, corruption, deletion, forks and paging, on the real stories260K model.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/cpu_backend.h"
#include "gtest/gtest.h"
#include "service/session_manager.h"
#include "tests/mirror_backend.h"
#include "tests/test_util.h"
#include "tiers/cold_store.h"

namespace kvmem {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const char* const kUserTurns[] = {
    "Once upon a time, there was a little dog named Max. Max loved to run in the park.",
    "One day, Max lost his red ball under a big tree. He was very sad.",
    "Then a kind girl named Sue came by. She said she would help Max.",
    "They looked under the tree and behind the bench and near the pond.",
    "At last they found the ball in the tall grass. Max was so happy.",
    "The next day Max and Sue played together again in the sun.",
};

// One step of a scripted conversation: append the user turn i, then generate.
struct Step {
  int turn;
  int max_tokens;
};
const std::vector<Step> kScript = {{0, 12}, {1, 12}, {2, 12}, {3, 12}, {4, 12}, {5, 12}};

class Server {
 public:
  // `mirror`: serve through MirrorBackend, whose sessions keep their hot rows with the backend
  // as on the GPU (tests/mirror_backend.h).
  Server(const Model& model, SessionManagerOptions options, bool mirror = false) {
    backend_ = std::make_unique<CpuBackend>(model, CpuBackendOptions{.threads = 1});
    if (mirror) mirror_ = std::make_unique<MirrorBackend>(model, backend_.get());
    auto m =
        SessionManager::Open(model, mirror ? static_cast<Backend&>(*mirror_) : *backend_, options);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) manager_ = std::move(*m);
  }
  SessionManager* operator->() { return manager_.get(); }
  SessionManager& get() { return *manager_; }

 private:
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<MirrorBackend> mirror_;
  std::unique_ptr<SessionManager> manager_;  // destroyed first
};

SessionManagerOptions Options(const std::string& dir) {
  SessionManagerOptions o;
  o.data_dir = dir;
  o.session_defaults.memory = {.policy = "snapkv", .budget = 48, .window = 8, .kernel = 5};
  o.session_defaults.recall_blocks = 4;
  o.warm_bytes = 64 << 10;  // small: some reads go to cold
  return o;
}

// Runs script steps [begin, end) on session `id`; returns the generated tokens.
std::vector<int32_t> RunSteps(SessionManager& m, const std::string& id, size_t begin, size_t end) {
  std::vector<int32_t> out;
  for (size_t i = begin; i < end; ++i) {
    auto a = m.AppendTurn({.session_id = id, .content = kUserTurns[kScript[i].turn]});
    EXPECT_TRUE(a.ok()) << a.status();
    GenerateRequest g{.session_id = id};
    g.options.sampling = {.temperature = 0.8f, .seed = 7 + i, .max_tokens = kScript[i].max_tokens};
    auto r = m.Generate(g, nullptr);
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok()) out.insert(out.end(), r->generation.tokens.begin(), r->generation.tokens.end());
  }
  return out;
}

uint64_t UidOf(const std::string& dir, const std::string& id) {
  auto cold = ColdStore::Open({.path = dir});
  EXPECT_TRUE(cold.ok());
  auto records = (*cold)->ListSessions();
  EXPECT_TRUE(records.ok());
  for (const SessionRecord& r : *records) {
    if (r.session_id == id) return r.uid;
  }
  return 0;
}

int64_t BlocksOf(const std::string& dir, uint64_t uid) {
  auto cold = ColdStore::Open({.path = dir});
  EXPECT_TRUE(cold.ok());
  return *(*cold)->CountBlocks(uid);
}

int64_t FileBlocksOf(const std::string& dir, uint64_t uid) {
  auto cold = ColdStore::Open({.path = dir});
  EXPECT_TRUE(cold.ok());
  return *(*cold)->CountFileBlocks(uid);
}

// The block file of owner `uid` (tiers/block_files.h).
std::string BlockFileOf(const std::string& dir, uint64_t uid) {
  return absl::StrFormat("%s/kvblocks/%016x.kvb", dir, uid);
}

class DurabilityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Model::Load(KVMEM_TEST_MODEL_DIR);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() { delete model_; }

  // The whole script in one uninterrupted store.
  std::vector<int32_t> Reference() {
    TempDir dir;
    Server server(*model_, Options(dir.path()));
    EXPECT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    return RunSteps(server.get(), "s", 0, kScript.size());
  }

  static Model* model_;
};
Model* DurabilityTest::model_ = nullptr;

TEST_F(DurabilityTest, RestartContinuesTokenForToken) {
  const std::vector<int32_t> want = Reference();
  TempDir dir;
  std::vector<int32_t> got;
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "s", .labels = {{"k", "v"}}}).ok());
    got = RunSteps(server.get(), "s", 0, 3);
  }
  Server server(*model_, Options(dir.path()));
  auto info = server->GetSession("", "s");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->stats.turns, 6);
  EXPECT_EQ(info->labels.at("k"), "v");
  auto rest = RunSteps(server.get(), "s", 3, kScript.size());
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, want);
}

TEST_F(DurabilityTest, BlocksInsideRocksDbAndInBlockFilesReadAlikeAcrossRestarts) {
  // A store written with blocks inside RocksDB (as before block files) reopens with block files
  // on: old blocks still read, new full blocks go to files, and the session continues token for
  // token.
  const std::vector<int32_t> want = Reference();
  TempDir dir;
  SessionManagerOptions options = Options(dir.path());
  options.cold_block_files = false;
  std::vector<int32_t> got;
  {
    Server server(*model_, options);
    ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    got = RunSteps(server.get(), "s", 0, 3);
  }
  const uint64_t uid = UidOf(dir.path(), "s");
  EXPECT_EQ(FileBlocksOf(dir.path(), uid), 0);
  options.cold_block_files = true;
  {
    Server server(*model_, options);
    auto rest = RunSteps(server.get(), "s", 3, kScript.size());
    got.insert(got.end(), rest.begin(), rest.end());
  }
  EXPECT_EQ(got, want);
  const int64_t in_files = FileBlocksOf(dir.path(), uid);
  EXPECT_GT(in_files, 0);
  EXPECT_LT(in_files, BlocksOf(dir.path(), uid));
}

TEST_F(DurabilityTest, RowsKeptByTheBackendSurvivePagingRestartsAndForks) {
  // As on the GPU: the host keeps hot positions only; paged-in, restarted and forked sessions
  // read their rows back from the store, and still continue token for token.
  const std::vector<int32_t> want = Reference();
  TempDir dir;
  SessionManagerOptions options = Options(dir.path());
  options.hot_bytes = 1;  // every idle session is paged out after each call
  std::vector<int32_t> got, forked;
  {
    Server server(*model_, options, /*mirror=*/true);
    ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    ASSERT_TRUE(server->CreateSession({.session_id = "other"}).ok());
    for (size_t i = 0; i < 3; ++i) {
      auto part = RunSteps(server.get(), "s", i, i + 1);
      got.insert(got.end(), part.begin(), part.end());
      ASSERT_TRUE(server->AppendTurn({.session_id = "other", .content = "The sun was warm."}).ok());
    }
    ASSERT_TRUE(server->ForkSession("", "s", "child").ok());
  }
  Server server(*model_, options, /*mirror=*/true);
  auto rest = RunSteps(server.get(), "s", 3, kScript.size());
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, want);
  forked = RunSteps(server.get(), "child", 3, kScript.size());
  EXPECT_EQ(forked, rest);
}

// Reads one byte from `fd` (false at EOF).
bool ReadByte(int fd) {
  char c;
  return read(fd, &c, 1) == 1;
}

TEST_F(DurabilityTest, StatefulPolicyRestartsWithItsMemory) {
  // h2o accumulates attention scores across turns; they are saved with every commit.
  auto options = [](const std::string& dir) {
    SessionManagerOptions o = Options(dir);
    o.session_defaults.memory = {.policy = "h2o", .budget = 24};
    o.session_defaults.recall_blocks = 0;
    return o;
  };
  std::vector<int32_t> want;
  {
    TempDir dir;
    Server server(*model_, options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    want = RunSteps(server.get(), "s", 0, kScript.size());
  }
  TempDir dir;
  std::vector<int32_t> got;
  for (size_t step = 0; step < kScript.size(); ++step) {  // a restart before every step
    Server server(*model_, options(dir.path()));
    if (step == 0) ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    auto part = RunSteps(server.get(), "s", step, step + 1);
    got.insert(got.end(), part.begin(), part.end());
  }
  EXPECT_EQ(got, want);
}

TEST_F(DurabilityTest, KillNineMidSessionThenReopenContinuesTokenForToken) {
  const std::vector<int32_t> want = Reference();
  TempDir dir;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // child: run the first half, report, then hang holding the store open
    close(fds[0]);
    Server server(*model_, Options(dir.path()));
    bool ok = server->CreateSession({.session_id = "s"}).ok();
    auto first = RunSteps(server.get(), "s", 0, 3);
    std::ofstream(dir.path() + "/first_half") << first.size();
    const char c = ok ? 1 : 0;
    (void)!write(fds[1], &c, 1);
    for (;;) pause();
  }
  close(fds[1]);
  ASSERT_TRUE(ReadByte(fds[0]));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  close(fds[0]);
  ASSERT_TRUE(WIFSIGNALED(status));

  Server server(*model_, Options(dir.path()));
  auto info = server->GetSession("", "s");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->stats.turns, 6);
  auto rest = RunSteps(server.get(), "s", 3, kScript.size());
  const size_t first = std::stoul(testing::ReadText(dir.path() + "/first_half"));
  ASSERT_EQ(first + rest.size(), want.size());
  EXPECT_TRUE(std::equal(rest.begin(), rest.end(), want.begin() + first));
}

TEST_F(DurabilityTest, CrashDuringCommitLeavesTheLastCommittedTurn) {
  TempDir dir;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // child: append turns forever, acknowledging each commit
    close(fds[0]);
    Server server(*model_, Options(dir.path()));
    if (!server->CreateSession({.session_id = "s"}).ok()) _exit(1);
    for (int i = 0;; ++i) {
      if (!server->AppendTurn({.session_id = "s", .content = kUserTurns[i % 6]}).ok()) _exit(1);
      const char c = 1;
      (void)!write(fds[1], &c, 1);
    }
  }
  close(fds[1]);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(ReadByte(fds[0]));
  std::mt19937 rng(std::random_device{}());
  usleep(rng() % 20000);  // land somewhere inside a later turn, often inside its commit
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  int acked = 3;
  while (ReadByte(fds[0])) ++acked;
  close(fds[0]);

  int64_t turns = 0;
  {
    Server server(*model_, Options(dir.path()));
    auto info = server->GetSession("", "s");
    ASSERT_TRUE(info.ok()) << info.status();
    turns = info->stats.turns;
    EXPECT_GE(turns, acked);      // every acknowledged turn survived
    EXPECT_LE(turns, acked + 1);  // at most the one in flight besides
    // It continues, and matches a session that never crashed.
    ASSERT_TRUE(server->AppendTurn({.session_id = "s", .content = "The end."}).ok());
    GenerateRequest g{.session_id = "s"};
    g.options.sampling.max_tokens = 10;
    auto resumed = server->Generate(g, nullptr);
    ASSERT_TRUE(resumed.ok()) << resumed.status();

    ASSERT_TRUE(server->CreateSession({.session_id = "ref"}).ok());
    for (int i = 0; i < turns; ++i) {
      ASSERT_TRUE(server->AppendTurn({.session_id = "ref", .content = kUserTurns[i % 6]}).ok());
    }
    ASSERT_TRUE(server->AppendTurn({.session_id = "ref", .content = "The end."}).ok());
    g.session_id = "ref";
    auto reference = server->Generate(g, nullptr);
    ASSERT_TRUE(reference.ok());
    EXPECT_EQ(resumed->generation.tokens, reference->generation.tokens);
    auto a = server->GetSession("", "s");
    auto b = server->GetSession("", "ref");
    EXPECT_EQ(a->stats.hot_tokens_per_head, b->stats.hot_tokens_per_head);
    EXPECT_EQ(a->stats.total_tokens, b->stats.total_tokens);
  }
}

TEST_F(DurabilityTest, SessionFromOtherWeightsIsRefused) {
  TempDir store;
  {
    Server server(*model_, Options(store.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    ASSERT_TRUE(server->AppendTurn({.session_id = "s", .content = kUserTurns[0]}).ok());
  }
  // The same model with one weight changed.
  TempDir other;
  fs::copy(KVMEM_TEST_MODEL_DIR, other.path(), fs::copy_options::recursive);
  {
    auto file = SafetensorsFile::Open(other.path() + "/model.safetensors");
    ASSERT_TRUE(file.ok());
    const TensorView* t = (*file)->Find("model.norm.weight");
    ASSERT_NE(t, nullptr);
    const size_t offset = t->data - (reinterpret_cast<const uint8_t*>((*file)->header().data()) - 8);
    file->reset();
    std::fstream f(other.path() + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(offset + 1));
    f.put('\x42');
  }
  auto model2 = Model::Load(other.path());
  ASSERT_TRUE(model2.ok()) << model2.status();
  ASSERT_NE((*model2)->fingerprint(), model_->fingerprint());
  Server server(**model2, Options(store.path()));
  auto listed = server->ListSessions({});
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->sessions.size(), 1u);
  EXPECT_EQ(listed->sessions[0].model_fingerprint, model_->fingerprint());
  auto a = server->AppendTurn({.session_id = "s", .content = "more"});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(a.status().message().find(model_->fingerprint()), absl::string_view::npos);
  GenerateRequest g{.session_id = "s"};
  EXPECT_EQ(server->Generate(g, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(server->ForkSession("", "s", "f").status().code(),
            absl::StatusCode::kFailedPrecondition);
  // New sessions under the new weights work.
  ASSERT_TRUE(server->CreateSession({.session_id = "t"}).ok());
  EXPECT_TRUE(server->AppendTurn({.session_id = "t", .content = "hello"}).ok());
}

TEST_F(DurabilityTest, CorruptBlockFailsOnlyItsSession) {
  TempDir dir;
  {
    Server server(*model_, Options(dir.path()));
    for (const char* id : {"a", "b"}) {
      ASSERT_TRUE(server->CreateSession({.session_id = id}).ok());
      RunSteps(server.get(), id, 0, 2);
    }
  }
  {
    auto cold = ColdStore::Open({.path = dir.path()});
    ASSERT_TRUE(cold.ok()) << cold.status();
    auto records = (*cold)->ListSessions();
    ASSERT_TRUE(records.ok());
    const SessionRecord& a = (*records)[0].session_id == "a" ? (*records)[0] : (*records)[1];
    const int B = a.options.block_size;
    for (int64_t index = 0; index * B < a.position; ++index) {
      auto block = (*cold)->ReadBlock({a.uid, 0, index}, B, 4, 8);
      ASSERT_TRUE(block.ok());
      std::string bytes = EncodeBlock(**block, 4, 8);
      bytes[bytes.size() / 2] ^= 0x10;
      ASSERT_TRUE((*cold)->PutRawBlock({a.uid, 0, index}, bytes).ok());
    }
  }
  Server server(*model_, Options(dir.path()));
  auto bad = server->AppendTurn({.session_id = "a", .content = "more"});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("\"a\""), absl::string_view::npos) << bad.status();
  auto good = server->AppendTurn({.session_id = "b", .content = "more"});
  EXPECT_TRUE(good.ok()) << good.status();
}

TEST_F(DurabilityTest, DamagedOrCutBlockFileFailsOnlyItsSessionAsDataLoss) {
  for (bool cut : {false, true}) {
    TempDir dir;
    {
      Server server(*model_, Options(dir.path()));
      for (const char* id : {"a", "b"}) {
        ASSERT_TRUE(server->CreateSession({.session_id = id}).ok());
        RunSteps(server.get(), id, 0, 2);
      }
    }
    const std::string file = BlockFileOf(dir.path(), UidOf(dir.path(), "a"));
    const auto size = std::filesystem::file_size(file);
    ASSERT_GT(size, 0u);
    if (cut) {
      std::filesystem::resize_file(file, size / 2);
    } else {
      // Flip one byte in every 4 KiB: every block of the file is damaged.
      std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
      for (std::streamoff at = 100; at < static_cast<std::streamoff>(size); at += 4096) {
        f.seekg(at);
        const char c = static_cast<char>(f.get() ^ 0x10);
        f.seekp(at);
        f.put(c);
      }
    }
    Server server(*model_, Options(dir.path()));
    auto bad = server->AppendTurn({.session_id = "a", .content = "more"});
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss) << cut;
    EXPECT_NE(bad.status().message().find("\"a\""), absl::string_view::npos) << bad.status();
    auto good = server->AppendTurn({.session_id = "b", .content = "more"});
    EXPECT_TRUE(good.ok()) << good.status();
  }
}

TEST_F(DurabilityTest, DeleteRemovesTheSessionFromEveryTier) {
  TempDir dir;
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "gone"}).ok());
    ASSERT_TRUE(server->CreateSession({.session_id = "kept"}).ok());
    RunSteps(server.get(), "gone", 0, 2);
    RunSteps(server.get(), "kept", 0, 1);
  }
  const uint64_t uid = UidOf(dir.path(), "gone");
  ASSERT_GT(BlocksOf(dir.path(), uid), 0);
  ASSERT_GT(FileBlocksOf(dir.path(), uid), 0);
  ASSERT_TRUE(std::filesystem::exists(BlockFileOf(dir.path(), uid)));
  {
    Server server(*model_, Options(dir.path()));
    auto before = server->GetSession("", "gone");
    ASSERT_TRUE(before.ok());
    EXPECT_GT(before->warm_blocks, 0);  // paged in: its blocks are warm
    ASSERT_TRUE(server->DeleteSession("", "gone").ok());
    EXPECT_EQ(server->GetSession("", "gone").status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(server->DeleteSession("", "gone").code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(server->AppendTurn({.session_id = "gone", .content = "x"}).status().code(),
              absl::StatusCode::kNotFound);
  }
  EXPECT_EQ(BlocksOf(dir.path(), uid), 0);
  EXPECT_FALSE(std::filesystem::exists(BlockFileOf(dir.path(), uid)));
  EXPECT_TRUE(std::filesystem::exists(BlockFileOf(dir.path(), UidOf(dir.path(), "kept"))));
  Server server(*model_, Options(dir.path()));
  auto listed = server->ListSessions({});
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->sessions.size(), 1u);
  EXPECT_EQ(listed->sessions[0].session_id, "kept");
}

TEST_F(DurabilityTest, ForkSharesBlocksAndOutlivesItsParent) {
  TempDir dir;
  std::vector<int32_t> forked, reference;
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "parent"}).ok());
    RunSteps(server.get(), "parent", 0, 3);
    auto fork = server->ForkSession("", "parent", "child");
    ASSERT_TRUE(fork.ok()) << fork.status();
    EXPECT_EQ(fork->stats.turns, 6);
    EXPECT_EQ(server->ForkSession("", "parent", "child").status().code(),
              absl::StatusCode::kAlreadyExists);
    // The parent moves on; the child must not see it.
    RunSteps(server.get(), "parent", 5, 6);
    ASSERT_TRUE(server->DeleteSession("", "parent").ok());
    forked = RunSteps(server.get(), "child", 3, 5);

    ASSERT_TRUE(server->CreateSession({.session_id = "reference"}).ok());
    RunSteps(server.get(), "reference", 0, 3);
    reference = RunSteps(server.get(), "reference", 3, 5);
  }
  EXPECT_EQ(forked, reference);
  const uint64_t parent_uid = UidOf(dir.path(), "child") - 1;  // uids are allocated in order
  EXPECT_GT(BlocksOf(dir.path(), parent_uid), 0);  // still referenced by the child
  EXPECT_TRUE(std::filesystem::exists(BlockFileOf(dir.path(), parent_uid)));
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->DeleteSession("", "child").ok());
  }
  EXPECT_EQ(BlocksOf(dir.path(), parent_uid), 0);
  EXPECT_FALSE(std::filesystem::exists(BlockFileOf(dir.path(), parent_uid)));
}

TEST_F(DurabilityTest, DeletingAForkChainFreesEveryBlock) {
  TempDir dir;
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "p"}).ok());
    RunSteps(server.get(), "p", 0, 1);
    ASSERT_TRUE(server->ForkSession("", "p", "c").ok());
    ASSERT_TRUE(server->ForkSession("", "c", "d").ok());  // before c writes anything
    RunSteps(server.get(), "c", 1, 2);
    RunSteps(server.get(), "d", 2, 3);
  }
  const std::vector<uint64_t> uids = {UidOf(dir.path(), "p"), UidOf(dir.path(), "c"),
                                      UidOf(dir.path(), "d")};
  for (uint64_t uid : uids) EXPECT_GT(BlocksOf(dir.path(), uid), 0) << uid;
  {
    Server server(*model_, Options(dir.path()));
    for (const char* id : {"d", "c", "p"}) ASSERT_TRUE(server->DeleteSession("", id).ok()) << id;
  }
  for (uint64_t uid : uids) {
    EXPECT_EQ(BlocksOf(dir.path(), uid), 0) << uid;
    EXPECT_FALSE(std::filesystem::exists(BlockFileOf(dir.path(), uid))) << uid;
  }
}

TEST_F(DurabilityTest, HotBudgetPagesOutIdleSessionsAndPagesThemBackIn) {
  const std::vector<int32_t> want = Reference();
  TempDir dir;
  SessionManagerOptions options = Options(dir.path());
  options.hot_bytes = 1;  // every idle session is paged out after each call
  Server server(*model_, options);
  ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
  ASSERT_TRUE(server->CreateSession({.session_id = "other"}).ok());
  std::vector<int32_t> got;
  for (size_t i = 0; i < kScript.size(); ++i) {
    auto part = RunSteps(server.get(), "s", i, i + 1);
    got.insert(got.end(), part.begin(), part.end());
    ASSERT_TRUE(server->AppendTurn({.session_id = "other", .content = "The sun was warm."}).ok());
    auto listed = server->ListSessions({});
    ASSERT_TRUE(listed.ok());
    for (const SessionInfo& s : listed->sessions) {
      EXPECT_EQ(s.resident, s.session_id == "other") << s.session_id;
    }
  }
  EXPECT_EQ(got, want);
}

TEST_F(DurabilityTest, LongSessionWithSmallBudgetRecallsFromWarmAndCold) {
  TempDir dir;
  SessionManagerOptions options = Options(dir.path());
  options.warm_bytes = 96 << 10;  // 24 blocks of 4 KiB out of the ~300 the session writes
  Server server(*model_, options);
  ASSERT_TRUE(server->CreateSession({.session_id = "long"}).ok());
  int64_t recalled = 0, cold = 0, warm = 0;
  for (int i = 0; i < 100; ++i) {
    auto r = server->AppendTurn({.session_id = "long", .content = kUserTurns[i % 6]});
    ASSERT_TRUE(r.ok()) << r.status();
    recalled += r->recalled_blocks;
    cold += r->cold_reads;
    warm += r->warm_hits;
    EXPECT_EQ(r->hot_tokens, std::min<int64_t>(48, r->total_tokens) * 5 * 4);
  }
  auto info = server->GetSession("", "long");
  ASSERT_TRUE(info.ok());
  EXPECT_GT(info->stats.total_tokens, 2000);  // thousands of tokens, 48 hot per head
  EXPECT_GT(recalled, 0);
  EXPECT_GT(cold, 0);
  EXPECT_GT(warm, 0);
  EXPECT_LE(info->warm_bytes, options.warm_bytes);
  EXPECT_EQ(info->cold_blocks, 5 * ((info->stats.total_tokens + 15) / 16));
}

TEST_F(DurabilityTest, RetriedRequestIdIsAppliedOnceEvenAcrossRestart) {
  TempDir dir;
  {
    Server server(*model_, Options(dir.path()));
    ASSERT_TRUE(server->CreateSession({.session_id = "s"}).ok());
    auto a = server->AppendTurn({.session_id = "s", .content = "hi", .request_id = "r1"});
    auto b = server->AppendTurn({.session_id = "s", .content = "hi", .request_id = "r1"});
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->turn_index, b->turn_index);
    EXPECT_EQ(server->GetSession("", "s")->stats.turns, 1);
  }
  Server server(*model_, Options(dir.path()));
  auto c = server->AppendTurn({.session_id = "s", .content = "hi", .request_id = "r1"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->turn_index, 0);
  EXPECT_EQ(server->GetSession("", "s")->stats.turns, 1);
  // An id used by one kind of call cannot be replayed by the other.
  GenerateRequest g{.session_id = "s", .request_id = "r1"};
  EXPECT_EQ(server->Generate(g, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  g.request_id = "g1";
  ASSERT_TRUE(server->Generate(g, nullptr).ok());
  EXPECT_EQ(server->AppendTurn({.session_id = "s", .content = "hi", .request_id = "g1"})
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(server->AppendTurn({.session_id = "s", .content = "x", .expected_turns = 5})
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace kvmem
