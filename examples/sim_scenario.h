// Scenarios for kvmem-sim: sessions of scripted turns with planted facts and later probes.
//
// A scenario file is JSON:
//
//   {
//     "name": "pets",                      // optional
//     "chat_template": "raw",              // optional, default "raw"
//     "sessions": [
//       {
//         "name": "s0",                    // optional, default "session<i>"
//         "turns": [
//           {"role": "user", "text": "Once upon a time, there was a cat named Sue.",
//            "fact": "cat-name"},          // plants fact "cat-name": this turn's tokens
//           {"role": "assistant", "text": "The sun was warm."},
//           {"role": "user", "text": "The cat's name was",
//            "probe": {"fact": "cat-name", "answer": "Sue"}}
//         ]
//       }
//     ]
//   }
//
// Every turn is appended with its text as given (teacher forcing), so every strategy sees the
// same tokens. A probe turn appends "<text> <answer>"; the answer's tokens are what the probe
// measures. Unknown keys are errors, so a misspelt key never silently changes a run.
#ifndef KVMEM_EXAMPLES_SIM_SCENARIO_H_
#define KVMEM_EXAMPLES_SIM_SCENARIO_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/chat_template.h"
#include "nlohmann/json.hpp"

namespace kvmem::sim {

struct Probe {
  std::string fact;    // id of a fact planted by an earlier turn of the same session
  std::string answer;  // the continuation of the prompt that the fact supports
};

struct ScenarioTurn {
  Role role = Role::kUser;
  std::string text;            // a probe's prompt
  std::string fact;            // non-empty: this turn plants the fact with this id
  std::optional<Probe> probe;  // set: this turn probes an earlier fact

  // The text appended to the session: `text`, or "<text> <answer>" for a probe.
  std::string AppendedText() const;
};

struct ScenarioSession {
  std::string name;
  std::vector<ScenarioTurn> turns;
};

struct Scenario {
  std::string name;
  std::string chat_template = "raw";
  std::vector<ScenarioSession> sessions;
};

// Parses a scenario from JSON text. INVALID_ARGUMENT with a message that starts with `source`,
// then the line and column of a syntax error or the JSON path of the offending value
// (e.g. "sessions[1].turns[3].probe.fact"), and says what is expected there.
absl::StatusOr<Scenario> ParseScenario(std::string_view json_text,
                                       std::string_view source = "scenario");

// Reads and parses a scenario file. NOT_FOUND when it cannot be opened; otherwise as
// ParseScenario with the path as source.
absl::StatusOr<Scenario> LoadScenarioFile(const std::string& path);

// The JSON form ParseScenario reads back to an equal scenario.
nlohmann::json ScenarioToJson(const Scenario& scenario);

struct SyntheticOptions {
  // Default: 8. Sessions to generate.
  int sessions = 8;
  // Default: 12. Turns per session, probes included.
  int turns = 12;
  // Default: 2. Facts per session: planted in the first turns, probed in the last turns
  // (one probe each, in shuffled order). Needs 2 * facts <= turns.
  int facts = 2;
  // Default: 1. Seed of every random choice; equal options give equal scenarios.
  uint32_t seed = 1;
  // Default: 2. Filler turns hold between 1 and this many sentences.
  int max_filler_sentences = 2;
};

// A TinyStories-style scenario that stories260K can follow: each fact introduces an animal
// with a name ("... a little cat named Sue."), fillers are nameless story sentences, and each
// probe asks for a name ("The cat's name was" -> "Sue"). Small models copy the rest of a name
// from context once its first letter is given, so a strategy that lost the fact loses
// probability on the answer. INVALID_ARGUMENT for counts out of range.
absl::StatusOr<Scenario> GenerateScenario(const SyntheticOptions& options);

}  // namespace kvmem::sim

#endif  // KVMEM_EXAMPLES_SIM_SCENARIO_H_
