#include "client/remote_commands.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/agent_memory_client.h"
#include "client/cli_flags.h"
#include "nlohmann/json.hpp"

namespace kvmem {

const char kRemoteUsage[] =
    "Server commands (kvmemd at --addr HOST:PORT, default $KVMEM_ADDR or 127.0.0.1:50051;\n"
    "--token T or $KVMEM_TOKEN for \"authorization: Bearer T\"; --timeout-ms N per call):\n"
    "  kvmem create [--id ID] [--policy P] [--hot-budget N] [--window W] [--kernel K]\n"
    "               [--pooling max|avg] [--recall-blocks R] [--template T] [--label K=V]...\n"
    "      creates a session and prints its id\n"
    "  kvmem append ID --text T|- [--role system|user|assistant|tool] [--expected-turns N]\n"
    "               [--request-id R] [--json]     appends a turn (--text - reads stdin)\n"
    "  kvmem generate ID [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
    "               [--stop S]... [--discard] [--ignore-eos] [--expected-turns N]\n"
    "               [--request-id R] [--json]     streams the reply to stdout\n"
    "  kvmem show ID [--json]                     tokens, turns, hot set, warm/cold blocks\n"
    "  kvmem ls [--label K=V]... [--json]         lists sessions\n"
    "  kvmem fork ID [--id NEW]                   prints the new session's id\n"
    "  kvmem rm ID                                deletes a session\n"
    "  kvmem chat ID [generate flags]             interactive: each stdin line is a user turn\n";

namespace {

const std::vector<std::string> kGlobalFlags = {"addr", "token", "timeout-ms"};
const std::vector<std::string> kSamplingFlags = {"max-tokens", "temperature", "top-p",
                                                 "top-k",      "seed",        "stop"};

int UsageError(const std::string& message) {
  std::fprintf(stderr, "kvmem: %s\n(kvmem help shows the usage)\n", message.c_str());
  return 2;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvmem: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

void PrintJson(const nlohmann::json& json) { std::cout << json.dump(2) << std::endl; }

// "K=V" pairs of a repeated flag.
absl::Status ParseLabels(const CliArgs& args, const std::string& flag,
                         std::map<std::string, std::string>* labels) {
  for (const std::string& pair : args.All(flag)) {
    const size_t eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, " takes KEY=VALUE, got \"", pair, "\""));
    }
    (*labels)[pair.substr(0, eq)] = pair.substr(eq + 1);
  }
  return absl::OkStatus();
}

// --expected-turns and --request-id, shared by AppendTurn and Generate requests.
template <typename Request>
absl::Status SetRetryFields(const CliArgs& args, Request* request) {
  if (args.Has("expected-turns")) {
    int64_t expected = 0;
    if (absl::Status s = args.GetInt64("expected-turns", &expected); !s.ok()) return s;
    request->set_expected_turns(expected);
  }
  request->set_request_id(args.Get("request-id"));
  return absl::OkStatus();
}

absl::Status ParseSampling(const CliArgs& args, v1::GenerateRequest* request) {
  int max_tokens = 0, top_k = 0;
  float temperature = 0, top_p = 0;
  uint64_t seed = 0;
  for (absl::Status s : {args.GetInt("max-tokens", &max_tokens),
                         args.GetFloat("temperature", &temperature), args.GetFloat("top-p", &top_p),
                         args.GetInt("top-k", &top_k), args.GetUint64("seed", &seed)}) {
    if (!s.ok()) return s;
  }
  request->set_max_tokens(max_tokens);
  request->set_temperature(temperature);
  request->set_top_p(top_p);
  request->set_top_k(top_k);
  request->set_seed(seed);
  for (const std::string& stop : args.All("stop")) request->add_stop(stop);
  return absl::OkStatus();
}

nlohmann::json SessionJson(const v1::Session& s) {
  nlohmann::json per_head = nlohmann::json::array();
  for (int l = 0; l < s.num_layers(); ++l) {
    nlohmann::json layer = nlohmann::json::array();
    for (int g = 0; g < s.num_kv_heads(); ++g) {
      const int i = l * s.num_kv_heads() + g;
      layer.push_back(i < s.hot_tokens_per_head_size() ? s.hot_tokens_per_head(i) : 0);
    }
    per_head.push_back(layer);
  }
  const v1::MemoryPolicy& m = s.memory();
  return {
      {"session_id", s.session_id()},
      {"labels", std::map<std::string, std::string>(s.labels().begin(), s.labels().end())},
      {"chat_template", s.chat_template()},
      {"memory",
       {{"policy", m.policy()},
        {"hot_budget", m.hot_budget()},
        {"window", m.window()},
        {"kernel", m.kernel()},
        {"pooling", PoolingName(m.pooling())},
        {"recall_blocks", m.recall_blocks()}}},
      {"block_size", s.block_size()},
      {"created_unix_ms", s.created_unix_ms()},
      {"updated_unix_ms", s.updated_unix_ms()},
      {"total_tokens", s.total_tokens()},
      {"turns", s.turns()},
      {"hot_tokens", s.hot_tokens()},
      {"hot_tokens_per_head", per_head},
      {"hot_bytes", s.hot_bytes()},
      {"warm_blocks", s.warm_blocks()},
      {"warm_bytes", s.warm_bytes()},
      {"cold_blocks", s.cold_blocks()},
      {"cold_bytes", s.cold_bytes()},
      {"resident", s.resident()},
      {"model_fingerprint", s.model_fingerprint()},
      {"recalled_blocks", s.recalled_blocks()},
  };
}

std::string LabelsText(const v1::Session& s) {
  std::map<std::string, std::string> sorted(s.labels().begin(), s.labels().end());
  return absl::StrJoin(sorted, ",", absl::PairFormatter("="));
}

// --- The subcommands ---------------------------------------------------------------------

int Create(AgentMemoryClient& client, const CliArgs& args) {
  v1::CreateSessionRequest request;
  request.set_session_id(args.Get("id"));
  request.set_chat_template(args.Get("template"));
  std::map<std::string, std::string> labels;
  if (absl::Status s = ParseLabels(args, "label", &labels); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  request.mutable_labels()->insert(labels.begin(), labels.end());
  v1::MemoryPolicy* m = request.mutable_memory();
  if (args.Has("policy")) m->set_policy(args.Get("policy"));
  struct IntField {
    const char* flag;
    void (v1::MemoryPolicy::*set)(int32_t);
  };
  for (const IntField& f : {IntField{"hot-budget", &v1::MemoryPolicy::set_hot_budget},
                            IntField{"window", &v1::MemoryPolicy::set_window},
                            IntField{"kernel", &v1::MemoryPolicy::set_kernel},
                            IntField{"recall-blocks", &v1::MemoryPolicy::set_recall_blocks}}) {
    if (!args.Has(f.flag)) continue;
    int value = 0;
    if (absl::Status s = args.GetInt(f.flag, &value); !s.ok()) {
      return UsageError(std::string(s.message()));
    }
    (m->*f.set)(value);
  }
  if (args.Has("pooling")) {
    absl::StatusOr<v1::Pooling> pooling = PoolingFromName(args.Get("pooling"));
    if (!pooling.ok()) return UsageError(std::string(pooling.status().message()));
    m->set_pooling(*pooling);
  }
  absl::StatusOr<v1::Session> session = client.CreateSession(request);
  if (!session.ok()) return Fail(session.status());
  std::cout << session->session_id() << std::endl;
  return 0;
}

int Append(AgentMemoryClient& client, const CliArgs& args) {
  if (!args.Has("text")) return UsageError("append needs --text TEXT (or --text - for stdin)");
  v1::AppendTurnRequest request;
  request.set_session_id(args.positional[0]);
  absl::StatusOr<v1::Role> role = RoleFromName(args.Get("role", "user"));
  if (!role.ok()) return UsageError(std::string(role.status().message()));
  request.set_role(*role);
  std::string text = args.Get("text");
  if (text == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  request.set_content(text);
  if (absl::Status s = SetRetryFields(args, &request); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  absl::StatusOr<v1::AppendTurnResponse> r = client.AppendTurn(request);
  if (!r.ok()) return Fail(r.status());
  if (args.Has("json")) {
    PrintJson({{"turn_index", r->turn_index()},
               {"turn_tokens", r->turn_tokens()},
               {"total_tokens", r->total_tokens()},
               {"hot_tokens", r->hot_tokens()},
               {"evicted", r->evicted()},
               {"recalled_blocks", r->recalled_blocks()},
               {"prefill_ms", r->timings().prefill_ms()},
               {"commit_ms", r->timings().commit_ms()},
               {"total_ms", r->timings().total_ms()}});
  } else {
    std::cout << "turn " << r->turn_index() << ": " << r->turn_tokens() << " tokens ("
              << r->total_tokens() << " in the session, " << r->hot_tokens() << " hot entries, "
              << r->evicted() << " evicted)" << std::endl;
  }
  return 0;
}

// Streams one generation to stdout (or prints its usage as JSON). Returns the exit status.
int StreamGeneration(AgentMemoryClient& client, const v1::GenerateRequest& request, bool json) {
  absl::StatusOr<v1::GenerateUsage> usage =
      client.Generate(request, [json](std::string_view delta) {
        if (!json) {
          std::fwrite(delta.data(), 1, delta.size(), stdout);
          std::fflush(stdout);
        }
        return true;
      });
  if (!json) std::fputc('\n', stdout);
  if (!usage.ok()) return Fail(usage.status());
  if (json) {
    PrintJson({{"text", usage->text()},
               {"generated_tokens", usage->generated_tokens()},
               {"finish_reason", FinishReasonName(usage->finish_reason())},
               {"turn_index", usage->turn_index()},
               {"hot_tokens_attended", usage->hot_tokens_attended()},
               {"decode_ms", usage->timings().decode_ms()},
               {"total_ms", usage->timings().total_ms()}});
  }
  return 0;
}

int Generate(AgentMemoryClient& client, const CliArgs& args) {
  v1::GenerateRequest request;
  request.set_session_id(args.positional[0]);
  if (absl::Status s = ParseSampling(args, &request); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  request.set_discard(args.Has("discard"));
  request.set_ignore_eos(args.Has("ignore-eos"));
  if (absl::Status s = SetRetryFields(args, &request); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  return StreamGeneration(client, request, args.Has("json"));
}

int Show(AgentMemoryClient& client, const CliArgs& args) {
  absl::StatusOr<v1::Session> s = client.GetSession(args.positional[0]);
  if (!s.ok()) return Fail(s.status());
  if (args.Has("json")) {
    PrintJson(SessionJson(*s));
    return 0;
  }
  const v1::MemoryPolicy& m = s->memory();
  std::cout << "session      " << s->session_id() << "\n"
            << "labels       " << LabelsText(*s) << "\n"
            << "memory       " << m.policy() << ", hot budget " << m.hot_budget() << ", window "
            << m.window() << ", kernel " << m.kernel() << ", " << PoolingName(m.pooling())
            << " pooling, recall " << m.recall_blocks() << " blocks, template "
            << s->chat_template() << "\n"
            << "turns        " << s->turns() << "\n"
            << "tokens       " << s->total_tokens() << "\n"
            << "hot          " << s->hot_tokens() << " entries, " << s->hot_bytes() << " bytes"
            << (s->resident() ? "" : " (paged out)") << "\n";
  for (int l = 0; l < s->num_layers(); ++l) {
    std::cout << "  layer " << l << ":";
    for (int g = 0; g < s->num_kv_heads(); ++g) {
      const int i = l * s->num_kv_heads() + g;
      std::cout << " " << (i < s->hot_tokens_per_head_size() ? s->hot_tokens_per_head(i) : 0);
    }
    std::cout << "\n";
  }
  std::cout << "warm         " << s->warm_blocks() << " blocks, " << s->warm_bytes() << " bytes\n"
            << "cold         " << s->cold_blocks() << " blocks, " << s->cold_bytes() << " bytes"
            << std::endl;
  return 0;
}

int List(AgentMemoryClient& client, const CliArgs& args) {
  std::map<std::string, std::string> labels;
  if (absl::Status s = ParseLabels(args, "label", &labels); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  absl::StatusOr<std::vector<v1::Session>> sessions = client.ListAllSessions(labels);
  if (!sessions.ok()) return Fail(sessions.status());
  if (args.Has("json")) {
    nlohmann::json list = nlohmann::json::array();
    for (const v1::Session& s : *sessions) list.push_back(SessionJson(s));
    PrintJson(list);
    return 0;
  }
  std::printf("%-24s %6s %8s %8s  %s\n", "SESSION", "TURNS", "TOKENS", "HOT", "LABELS");
  for (const v1::Session& s : *sessions) {
    std::printf("%-24s %6lld %8lld %8lld  %s\n", s.session_id().c_str(),
                static_cast<long long>(s.turns()), static_cast<long long>(s.total_tokens()),
                static_cast<long long>(s.hot_tokens()), LabelsText(s).c_str());
  }
  return 0;
}

int Fork(AgentMemoryClient& client, const CliArgs& args) {
  absl::StatusOr<v1::Session> fork = client.ForkSession(args.positional[0], args.Get("id"));
  if (!fork.ok()) return Fail(fork.status());
  std::cout << fork->session_id() << std::endl;
  return 0;
}

int Remove(AgentMemoryClient& client, const CliArgs& args) {
  absl::Status s = client.DeleteSession(args.positional[0]);
  return s.ok() ? 0 : Fail(s);
}

// Each non-empty stdin line becomes a user turn, answered by a streamed generation. Ends at
// end of input; an error ends it with exit status 1.
int Chat(AgentMemoryClient& client, const CliArgs& args) {
  v1::GenerateRequest request;
  request.set_session_id(args.positional[0]);
  if (absl::Status s = ParseSampling(args, &request); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  request.set_ignore_eos(args.Has("ignore-eos"));
  const bool interactive = isatty(STDIN_FILENO);
  std::string line;
  for (;;) {
    if (interactive) std::fputs("you> ", stderr);
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    absl::StatusOr<v1::AppendTurnResponse> r =
        client.AppendTurn(request.session_id(), v1::ROLE_USER, line);
    if (!r.ok()) return Fail(r.status());
    if (int status = StreamGeneration(client, request, /*json=*/false); status != 0) return status;
  }
  return 0;
}

struct Command {
  int positionals;  // exactly this many (the session id, or none)
  std::vector<std::string> value_flags;
  std::vector<std::string> switches;
  std::function<int(AgentMemoryClient&, const CliArgs&)> run;
};

const std::map<std::string, Command>& Commands() {
  static const auto* commands = new std::map<std::string, Command>{
      {"create",
       {0,
        {"id", "policy", "hot-budget", "window", "kernel", "pooling", "recall-blocks", "template",
         "label"},
        {},
        Create}},
      {"append", {1, {"role", "text", "expected-turns", "request-id"}, {"json"}, Append}},
      {"generate",
       {1,
        {"max-tokens", "temperature", "top-p", "top-k", "seed", "stop", "expected-turns",
         "request-id"},
        {"discard", "ignore-eos", "json"},
        Generate}},
      {"show", {1, {}, {"json"}, Show}},
      {"ls", {0, {"label"}, {"json"}, List}},
      {"fork", {1, {"id"}, {}, Fork}},
      {"rm", {1, {}, {}, Remove}},
      {"chat", {1, kSamplingFlags, {"ignore-eos"}, Chat}},
  };
  return *commands;
}

}  // namespace

bool IsRemoteCommand(const std::string& command) { return Commands().count(command) > 0; }

int RunRemoteCommand(const std::string& command, const std::vector<std::string>& global_args,
                     const std::vector<std::string>& args) {
  const Command& c = Commands().at(command);
  std::vector<std::string> value_flags = c.value_flags;
  value_flags.insert(value_flags.end(), kGlobalFlags.begin(), kGlobalFlags.end());
  CliArgs parsed;
  std::vector<std::string> all = global_args;
  all.insert(all.end(), args.begin(), args.end());
  if (absl::Status s = ParseCliArgs(all, value_flags, c.switches, &parsed); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  if (static_cast<int>(parsed.positional.size()) != c.positionals) {
    return UsageError(c.positionals == 1
                          ? absl::StrCat(command, " takes one session id")
                          : absl::StrCat(command, " takes no positional arguments, got \"",
                                         parsed.positional.empty() ? "" : parsed.positional[0],
                                         "\""));
  }
  ClientOptions options;
  if (const char* addr = std::getenv("KVMEM_ADDR"); addr != nullptr && *addr) {
    options.address = addr;
  }
  if (const char* token = std::getenv("KVMEM_TOKEN"); token != nullptr) options.token = token;
  // The last --addr / --token wins, so a flag after the command overrides one before it.
  if (std::vector<std::string> v = parsed.All("addr"); !v.empty()) options.address = v.back();
  if (std::vector<std::string> v = parsed.All("token"); !v.empty()) options.token = v.back();
  if (absl::Status s = parsed.GetInt64("timeout-ms", &options.timeout_ms); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  AgentMemoryClient client(options);
  return c.run(client, parsed);
}

}  // namespace kvmem
