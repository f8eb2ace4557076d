#include "examples/sim_scenario.h"

#include <algorithm>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace kvmem::sim {
namespace {

using nlohmann::json;

// Errors of one parse: every message starts with the source and the JSON path.
class Errors {
 public:
  explicit Errors(std::string source) : source_(std::move(source)) {}
  absl::Status At(const std::string& path, absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": ", path.empty() ? std::string("top level") : path, ": ", what));
  }

 private:
  std::string source_;
};

const char* TypeName(const json& j) { return j.type_name(); }

absl::Status CheckKeys(const Errors& errors, const std::string& path, const json& object,
                       std::initializer_list<const char*> allowed) {
  for (const auto& [key, value] : object.items()) {
    if (std::find_if(allowed.begin(), allowed.end(), [&](const char* a) { return key == a; }) ==
        allowed.end()) {
      return errors.At(path, absl::StrCat("unknown key \"", key, "\" (expected one of ",
                                          absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

// The string at object[key]: required (non-empty) or optional (absent -> `fallback`).
absl::StatusOr<std::string> StringField(const Errors& errors, const std::string& path,
                                        const json& object, const char* key, bool required,
                                        const std::string& fallback = "") {
  const std::string at = path.empty() ? key : absl::StrCat(path, ".", key);
  auto it = object.find(key);
  if (it == object.end()) {
    if (required) return errors.At(path, absl::StrCat("missing \"", key, "\""));
    return fallback;
  }
  if (!it->is_string()) {
    return errors.At(at, absl::StrCat("expected a string, got ", TypeName(*it)));
  }
  std::string value = it->get<std::string>();
  if (value.empty()) return errors.At(at, "must not be empty");
  return value;
}

absl::StatusOr<ScenarioTurn> ParseTurn(const Errors& errors, const std::string& path, const json& j,
                                       std::set<std::string>* planted) {
  if (!j.is_object()) {
    return errors.At(path, absl::StrCat("expected a turn object, got ", TypeName(j)));
  }
  KVMEM_RETURN_IF_ERROR(CheckKeys(errors, path, j, {"role", "text", "fact", "probe"}));
  ScenarioTurn turn;
  KVMEM_ASSIGN_OR_RETURN(std::string role, StringField(errors, path, j, "role", true));
  auto parsed_role = ParseRole(role);
  if (!parsed_role.ok()) return errors.At(path + ".role", parsed_role.status().message());
  turn.role = *parsed_role;
  KVMEM_ASSIGN_OR_RETURN(turn.text, StringField(errors, path, j, "text", true));
  KVMEM_ASSIGN_OR_RETURN(turn.fact, StringField(errors, path, j, "fact", false));
  if (auto it = j.find("probe"); it != j.end()) {
    const std::string probe_path = path + ".probe";
    if (!it->is_object()) {
      return errors.At(probe_path, absl::StrCat("expected an object with \"fact\" and "
                                                "\"answer\", got ",
                                                TypeName(*it)));
    }
    KVMEM_RETURN_IF_ERROR(CheckKeys(errors, probe_path, *it, {"fact", "answer"}));
    Probe probe;
    KVMEM_ASSIGN_OR_RETURN(probe.fact, StringField(errors, probe_path, *it, "fact", true));
    KVMEM_ASSIGN_OR_RETURN(probe.answer, StringField(errors, probe_path, *it, "answer", true));
    if (!turn.fact.empty()) {
      return errors.At(path, "a turn either plants a fact or probes one, not both");
    }
    if (!planted->count(probe.fact)) {
      return errors.At(probe_path + ".fact",
                       absl::StrCat("fact \"", probe.fact,
                                    "\" is not planted by an earlier turn of this session"));
    }
    turn.probe = std::move(probe);
  }
  if (!turn.fact.empty() && !planted->insert(turn.fact).second) {
    return errors.At(path + ".fact",
                     absl::StrCat("fact \"", turn.fact, "\" is already planted in this session"));
  }
  return turn;
}

}  // namespace

std::string ScenarioTurn::AppendedText() const {
  return probe ? absl::StrCat(text, " ", probe->answer) : text;
}

absl::StatusOr<Scenario> ParseScenario(std::string_view json_text, std::string_view source) {
  const Errors errors{std::string(source)};
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::parse_error& e) {
    // nlohmann's message reads "[json.exception.parse_error.101] parse error at line L,
    // column C: ..."; keep the part a person needs.
    std::string what = e.what();
    if (auto pos = what.find("] "); pos != std::string::npos) what = what.substr(pos + 2);
    return absl::InvalidArgumentError(absl::StrCat(std::string(source), ": invalid JSON: ", what));
  }
  if (!root.is_object()) {
    return errors.At("",
                     absl::StrCat("expected an object with \"sessions\", got ", TypeName(root)));
  }
  KVMEM_RETURN_IF_ERROR(CheckKeys(errors, "", root, {"name", "chat_template", "sessions"}));
  Scenario scenario;
  KVMEM_ASSIGN_OR_RETURN(scenario.name, StringField(errors, "", root, "name", false, "scenario"));
  KVMEM_ASSIGN_OR_RETURN(scenario.chat_template,
                         StringField(errors, "", root, "chat_template", false, "raw"));
  auto sessions = root.find("sessions");
  if (sessions == root.end()) return errors.At("", "missing \"sessions\"");
  if (!sessions->is_array() || sessions->empty()) {
    return errors.At("sessions", "expected a non-empty array of sessions");
  }
  std::set<std::string> names;
  for (size_t s = 0; s < sessions->size(); ++s) {
    const std::string path = absl::StrCat("sessions[", s, "]");
    const json& js = (*sessions)[s];
    if (!js.is_object()) {
      return errors.At(path, absl::StrCat("expected a session object, got ", TypeName(js)));
    }
    KVMEM_RETURN_IF_ERROR(CheckKeys(errors, path, js, {"name", "turns"}));
    ScenarioSession session;
    KVMEM_ASSIGN_OR_RETURN(
        session.name, StringField(errors, path, js, "name", false, absl::StrCat("session", s)));
    if (!names.insert(session.name).second) {
      return errors.At(path + ".name",
                       absl::StrCat("session name \"", session.name, "\" is used twice"));
    }
    auto turns = js.find("turns");
    if (turns == js.end()) return errors.At(path, "missing \"turns\"");
    if (!turns->is_array() || turns->empty()) {
      return errors.At(path + ".turns", "expected a non-empty array of turns");
    }
    std::set<std::string> planted;
    for (size_t t = 0; t < turns->size(); ++t) {
      KVMEM_ASSIGN_OR_RETURN(
          ScenarioTurn turn,
          ParseTurn(errors, absl::StrCat(path, ".turns[", t, "]"), (*turns)[t], &planted));
      session.turns.push_back(std::move(turn));
    }
    scenario.sessions.push_back(std::move(session));
  }
  return scenario;
}

absl::StatusOr<Scenario> LoadScenarioFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open scenario file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return ParseScenario(text.str(), path);
}

nlohmann::json ScenarioToJson(const Scenario& scenario) {
  json sessions = json::array();
  for (const ScenarioSession& s : scenario.sessions) {
    json turns = json::array();
    for (const ScenarioTurn& t : s.turns) {
      json turn = {{"role", RoleName(t.role)}, {"text", t.text}};
      if (!t.fact.empty()) turn["fact"] = t.fact;
      if (t.probe) turn["probe"] = {{"fact", t.probe->fact}, {"answer", t.probe->answer}};
      turns.push_back(std::move(turn));
    }
    sessions.push_back({{"name", s.name}, {"turns", std::move(turns)}});
  }
  return {{"name", scenario.name},
          {"chat_template", scenario.chat_template},
          {"sessions", std::move(sessions)}};
}

absl::StatusOr<Scenario> GenerateScenario(const SyntheticOptions& o) {
  if (o.sessions <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic scenario: sessions must be positive, got ", o.sessions));
  }
  if (o.facts <= 0 || o.turns < 2 * o.facts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "synthetic scenario: needs at least one fact and turns >= 2 * facts (a plant and a "
        "probe each), got ",
        o.facts, " facts and ", o.turns, " turns"));
  }
  if (o.max_filler_sentences <= 0) {
    return absl::InvalidArgumentError("synthetic scenario: max_filler_sentences must be positive");
  }
  // Names whose later letters stories260K copies from context once the first is given.
  static const char* const kNames[] = {"Sue",  "Mia",   "Bob", "Sara", "Spot",  "Sam",
                                       "Ben",  "Kitty", "Pip", "Rex",  "Molly", "Benny",
                                       "Jill", "Kim",   "Tom", "Max"};
  static const char* const kAnimals[] = {"cat",  "dog",  "bird", "bunny", "fish",
                                         "bear", "frog", "duck", "pig",   "mouse"};
  static const char* const kFillers[] = {
      "The sun was warm and the birds sang in the trees.",
      "The children played in the park all day.",
      "They ran and jumped and laughed together.",
      "A big tree stood near the old house.",
      "It started to rain, so everyone went inside.",
      "Mom made a yummy cake for dinner.",
      "The wind blew the leaves across the yard.",
      "They found a shiny stone by the river.",
      "At night, the stars came out and the moon was bright.",
      "The flowers in the garden were red and yellow.",
      "A little bird built a nest in the tree.",
      "They shared their toys and were very happy.",
      "The water in the pond was cold and clear.",
      "There was a big box full of books.",
      "Everyone said thank you and smiled.",
      "They had a picnic with bread and apples.",
      "The snow was soft and white.",
      "They built a tall tower with blocks.",
      "The boat floated on the blue lake.",
      "The kids sang a happy song.",
      "Dad read a story before bed.",
      "It was a sunny day at the beach.",
  };
  std::mt19937 rng(o.seed);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint32_t>(n)); };
  Scenario scenario;
  scenario.name = absl::StrCat("synthetic-seed", o.seed);
  for (int s = 0; s < o.sessions; ++s) {
    ScenarioSession session;
    session.name = absl::StrCat("s", s);
    // Distinct names and animals within a session, so each probe has one right answer.
    std::vector<int> names(std::size(kNames)), animals(std::size(kAnimals));
    std::iota(names.begin(), names.end(), 0);
    std::iota(animals.begin(), animals.end(), 0);
    std::shuffle(names.begin(), names.end(), rng);
    std::shuffle(animals.begin(), animals.end(), rng);
    std::vector<int> probe_order(o.facts);
    std::iota(probe_order.begin(), probe_order.end(), 0);
    std::shuffle(probe_order.begin(), probe_order.end(), rng);
    for (int t = 0; t < o.turns; ++t) {
      ScenarioTurn turn;
      turn.role = t % 2 == 0 ? Role::kUser : Role::kAssistant;
      if (t < o.facts) {
        const std::string name = kNames[names[t]], animal = kAnimals[animals[t]];
        turn.text = absl::StrCat(t == 0 ? "Once upon a time, there" : "There", " was a little ",
                                 animal, " named ", name, ".");
        turn.fact = absl::StrCat(animal, "-name");
      } else if (t >= o.turns - o.facts) {
        const int f = probe_order[t - (o.turns - o.facts)];
        const std::string animal = kAnimals[animals[f]];
        turn.text =
            absl::StrCat("One day, the ", animal, " went out to play. The ", animal, "'s name was");
        turn.probe = Probe{absl::StrCat(animal, "-name"), kNames[names[f]]};
      } else {
        const int sentences = 1 + pick(o.max_filler_sentences);
        std::vector<std::string> parts;
        for (int i = 0; i < sentences; ++i) parts.push_back(kFillers[pick(std::size(kFillers))]);
        turn.text = absl::StrJoin(parts, " ");
      }
      session.turns.push_back(std::move(turn));
    }
    scenario.sessions.push_back(std::move(session));
  }
  return scenario;
}

}  // namespace kvmem::sim
