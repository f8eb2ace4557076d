// Scenario files: what parses, what each malformed file is told, and the built-in generator.
#include "examples/sim_scenario.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "gtest/gtest.h"

namespace kvmem::sim {
namespace {

constexpr char kValid[] = R"({
  "name": "pets",
  "sessions": [
    {"name": "a", "turns": [
      {"role": "user", "text": "Once upon a time, there was a cat named Sue.", "fact": "cat"},
      {"role": "assistant", "text": "The sun was warm."},
      {"role": "user", "text": "The cat's name was", "probe": {"fact": "cat", "answer": "Sue"}}
    ]},
    {"turns": [{"role": "system", "text": "Hello."}]}
  ]
})";

// The message of the INVALID_ARGUMENT that parsing `json` must give.
std::string ErrorOf(const std::string& json) {
  auto s = ParseScenario(json, "test.json");
  EXPECT_FALSE(s.ok()) << json;
  if (s.ok()) return "";
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(s.status().message());
}

// A one-session scenario whose turns array is `turns`.
std::string WithTurns(const std::string& turns) {
  return R"({"sessions": [{"name": "s", "turns": )" + turns + "}]}";
}

TEST(ScenarioTest, ParsesTurnsFactsAndProbes) {
  auto s = ParseScenario(kValid);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->name, "pets");
  EXPECT_EQ(s->chat_template, "raw");
  ASSERT_EQ(s->sessions.size(), 2u);
  EXPECT_EQ(s->sessions[1].name, "session1");
  const auto& turns = s->sessions[0].turns;
  ASSERT_EQ(turns.size(), 3u);
  EXPECT_EQ(turns[0].fact, "cat");
  EXPECT_FALSE(turns[0].probe.has_value());
  EXPECT_EQ(turns[1].role, Role::kAssistant);
  ASSERT_TRUE(turns[2].probe.has_value());
  EXPECT_EQ(turns[2].probe->fact, "cat");
  EXPECT_EQ(turns[2].AppendedText(), "The cat's name was Sue");
  EXPECT_EQ(turns[1].AppendedText(), "The sun was warm.");
}

TEST(ScenarioTest, JsonRoundTripGivesTheSameScenario) {
  auto s = ParseScenario(kValid);
  ASSERT_TRUE(s.ok());
  auto again = ParseScenario(ScenarioToJson(*s).dump());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ScenarioToJson(*again), ScenarioToJson(*s));
}

TEST(ScenarioTest, SyntaxErrorsGiveLineAndColumn) {
  const std::string m = ErrorOf("{\n  \"sessions\": [\n    {\"turns\": [}\n  ]\n}");
  EXPECT_EQ(m.rfind("test.json: invalid JSON: ", 0), 0u) << m;
  EXPECT_NE(m.find("line 3"), std::string::npos) << m;
  EXPECT_NE(m.find("column"), std::string::npos) << m;
}

TEST(ScenarioTest, StructuralErrorsNameTheJsonPathAndWhatIsExpected) {
  struct Case {
    std::string json;
    std::string expected;  // substring of the message
  };
  const Case cases[] = {
      {"[1, 2]", "test.json: top level: expected an object with \"sessions\", got array"},
      {"{}", "top level: missing \"sessions\""},
      {R"({"sessions": []})", "sessions: expected a non-empty array of sessions"},
      {R"({"sessions": [3]})", "sessions[0]: expected a session object, got number"},
      {R"({"sessions": [{}]})", "sessions[0]: missing \"turns\""},
      {R"({"sessions": [{"turns": []}]})", "sessions[0].turns: expected a non-empty array"},
      {R"({"sesions": []})",
       "top level: unknown key \"sesions\" (expected one of name, "
       "chat_template, sessions)"},
      {WithTurns(R"(["hi"])"), "sessions[0].turns[0]: expected a turn object, got string"},
      {WithTurns(R"([{"text": "hi"}])"), "sessions[0].turns[0]: missing \"role\""},
      {WithTurns(R"([{"role": "usr", "text": "hi"}])"),
       "sessions[0].turns[0].role: unknown role \"usr\": use system, user, assistant or tool"},
      {WithTurns(R"([{"role": "user"}])"), "sessions[0].turns[0]: missing \"text\""},
      {WithTurns(R"([{"role": "user", "text": ""}])"),
       "sessions[0].turns[0].text: must not be empty"},
      {WithTurns(R"([{"role": "user", "text": 7}])"),
       "sessions[0].turns[0].text: expected a string, got number"},
      {WithTurns(R"([{"role": "user", "txt": "hi"}])"),
       "sessions[0].turns[0]: unknown key \"txt\" (expected one of role, text, fact, probe)"},
      {WithTurns(R"([{"role": "user", "text": "hi", "probe": {"fact": "x", "answer": "y"}}])"),
       "sessions[0].turns[0].probe.fact: fact \"x\" is not planted by an earlier turn"},
      {WithTurns(R"([{"role": "user", "text": "hi", "probe": "x"}])"),
       "sessions[0].turns[0].probe: expected an object with \"fact\" and \"answer\", got string"},
      {WithTurns(R"([{"role": "user", "text": "a", "fact": "x"},
                     {"role": "user", "text": "b", "probe": {"fact": "x"}}])"),
       "sessions[0].turns[1].probe: missing \"answer\""},
      {WithTurns(R"([{"role": "user", "text": "a", "fact": "x"},
                     {"role": "user", "text": "b", "fact": "x"}])"),
       "sessions[0].turns[1].fact: fact \"x\" is already planted in this session"},
      {WithTurns(R"([{"role": "user", "text": "a", "fact": "x"},
                     {"role": "user", "text": "b", "fact": "y",
                      "probe": {"fact": "x", "answer": "c"}}])"),
       "sessions[0].turns[1]: a turn either plants a fact or probes one, not both"},
      {R"({"sessions": [{"name": "a", "turns": [{"role": "user", "text": "a"}]},
                        {"name": "a", "turns": [{"role": "user", "text": "b"}]}]})",
       "sessions[1].name: session name \"a\" is used twice"},
  };
  for (const Case& c : cases) {
    const std::string m = ErrorOf(c.json);
    EXPECT_NE(m.find(c.expected), std::string::npos)
        << "json: " << c.json << "\nmessage: " << m << "\nexpected: " << c.expected;
  }
}

TEST(ScenarioTest, AProbeMayOnlyUseFactsOfItsOwnSession) {
  const std::string m = ErrorOf(R"({"sessions": [
      {"turns": [{"role": "user", "text": "a", "fact": "x"}]},
      {"turns": [{"role": "user", "text": "b", "probe": {"fact": "x", "answer": "c"}}]}]})");
  EXPECT_NE(m.find("sessions[1].turns[0].probe.fact"), std::string::npos) << m;
}

TEST(ScenarioTest, MissingFileIsNotFoundNamingThePath) {
  auto s = LoadScenarioFile("/nonexistent/scenario.json");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("/nonexistent/scenario.json"), absl::string_view::npos);
}

TEST(ScenarioTest, FileErrorsStartWithThePath) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "kvmem-sim-scenario-test.json").string();
  std::ofstream(path) << R"({"sessions": [{"turns": [{"role": "user"}]}]})";
  auto s = LoadScenarioFile(path);
  std::remove(path.c_str());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().message().rfind(path + ": sessions[0].turns[0]: missing \"text\"", 0), 0u)
      << s.status();
}

TEST(ScenarioTest, ShippedExampleParses) {
  auto s = LoadScenarioFile(KVMEM_SOURCE_DIR "/examples/scenarios/pets.json");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->sessions.size(), 2u);
}

TEST(SyntheticScenarioTest, PlantsEveryFactEarlyAndProbesItLater) {
  auto s = GenerateScenario({.sessions = 5, .turns = 10, .facts = 3, .seed = 9});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->sessions.size(), 5u);
  for (const ScenarioSession& session : s->sessions) {
    ASSERT_EQ(session.turns.size(), 10u);
    std::set<std::string> planted, probed, answers;
    for (int t = 0; t < 10; ++t) {
      const ScenarioTurn& turn = session.turns[t];
      if (t < 3) {
        EXPECT_FALSE(turn.fact.empty());
        planted.insert(turn.fact);
      } else if (t >= 7) {
        ASSERT_TRUE(turn.probe.has_value());
        probed.insert(turn.probe->fact);
        answers.insert(turn.probe->answer);
        // The fact's text holds the answer.
        for (const ScenarioTurn& plant : session.turns) {
          if (plant.fact == turn.probe->fact) {
            EXPECT_NE(plant.text.find(turn.probe->answer), std::string::npos);
          }
        }
      } else {
        EXPECT_TRUE(turn.fact.empty());
        EXPECT_FALSE(turn.probe.has_value());
      }
    }
    EXPECT_EQ(planted.size(), 3u);
    EXPECT_EQ(probed, planted);
    EXPECT_EQ(answers.size(), 3u) << "answers within a session are distinct";
  }
  // It is a valid scenario file.
  EXPECT_TRUE(ParseScenario(ScenarioToJson(*s).dump()).ok());
}

TEST(SyntheticScenarioTest, SameSeedSameScenarioOtherSeedOtherScenario) {
  auto a = GenerateScenario({.seed = 4});
  auto b = GenerateScenario({.seed = 4});
  auto c = GenerateScenario({.seed = 5});
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(ScenarioToJson(*a), ScenarioToJson(*b));
  EXPECT_NE(ScenarioToJson(*a)["sessions"], ScenarioToJson(*c)["sessions"]);
}

TEST(SyntheticScenarioTest, ImpossibleCountsAreClearErrors) {
  EXPECT_EQ(GenerateScenario({.sessions = 0}).status().code(), absl::StatusCode::kInvalidArgument);
  auto s = GenerateScenario({.turns = 3, .facts = 2});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("turns >= 2 * facts"), absl::string_view::npos);
}

}  // namespace
}  // namespace kvmem::sim
