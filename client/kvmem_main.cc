// `kvmem`: the command-line tool. Subcommands:
//   complete  offline completion with the in-process engine (no server needed)
//   create, append, generate, show, ls, fork, rm, chat: a running kvmemd's sessions
//             (remote_commands.h)
#include <cstdio>
#include <string>
#include <vector>

#include "client/cli_flags.h"
#include "client/remote_commands.h"
#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/model.h"

namespace {

constexpr char kCompleteUsage[] =
    "usage: kvmem complete [--model DIR] --prompt TEXT [--max-tokens N] [--temperature T]\n"
    "                      [--top-p P] [--top-k K] [--seed S] [--stop S]... [--threads N]\n"
    "Prints only the generated continuation. The model is --model, else $KVMEM_MODEL,\n"
    "else ../shared/models/stories260K beside the project root.\n\n";

void PrintUsage(FILE* out) {
  std::fputs(kCompleteUsage, out);
  std::fputs(kvmem::kRemoteUsage, out);
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvmem: %s\n", message.c_str());
  return 2;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvmem: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

int RunComplete(const std::vector<std::string>& args) {
  kvmem::CliArgs flags;
  if (absl::Status s = kvmem::ParseCliArgs(args,
                                           {"model", "prompt", "max-tokens", "temperature", "top-p",
                                            "top-k", "seed", "stop", "threads"},
                                           {}, &flags);
      !s.ok()) {
    return Fail(std::string(s.message()) + "\n" + kCompleteUsage);
  }
  if (!flags.positional.empty()) {
    return Fail("unexpected argument " + flags.positional[0] + "\n" + kCompleteUsage);
  }
  if (!flags.Has("prompt")) return Fail(std::string("--prompt is required\n") + kCompleteUsage);
  kvmem::SamplingParams params;
  int threads = 0;
  for (absl::Status s :
       {flags.GetInt("max-tokens", &params.max_tokens),
        flags.GetFloat("temperature", &params.temperature), flags.GetFloat("top-p", &params.top_p),
        flags.GetInt("top-k", &params.top_k), flags.GetUint64("seed", &params.seed),
        flags.GetInt("threads", &threads)}) {
    if (!s.ok()) return Fail(std::string(s.message()));
  }
  params.stop = flags.All("stop");
  if (absl::Status s = kvmem::ValidateSamplingParams(params); !s.ok()) return Fail(s);

  auto dir = kvmem::ResolveModelDir(flags.Get("model"));
  if (!dir.ok()) return Fail(dir.status());
  auto model = kvmem::Model::Load(*dir);
  if (!model.ok()) return Fail(model.status());
  kvmem::CpuBackendOptions backend_options;
  backend_options.threads = threads;
  kvmem::CpuBackend backend(**model, backend_options);
  auto result =
      kvmem::Complete(**model, backend, flags.Get("prompt"), params, [](std::string_view delta) {
        std::fwrite(delta.data(), 1, delta.size(), stdout);
        std::fflush(stdout);
        return true;
      });
  if (!result.ok()) return Fail(result.status());
  std::fputc('\n', stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Global flags (--addr, --token, --timeout-ms) may come before the command.
  std::vector<std::string> global_args;
  int i = 1;
  while (i < argc) {
    const std::string arg = argv[i];
    const bool global = arg == "--addr" || arg == "--token" || arg == "--timeout-ms";
    const bool global_with_value = arg.rfind("--addr=", 0) == 0 || arg.rfind("--token=", 0) == 0 ||
                                   arg.rfind("--timeout-ms=", 0) == 0;
    if (global && i + 1 < argc) {
      global_args.push_back(arg);
      global_args.push_back(argv[i + 1]);
      i += 2;
    } else if (global_with_value) {
      global_args.push_back(arg);
      i += 1;
    } else {
      break;
    }
  }
  if (i == argc) {
    PrintUsage(stderr);
    return 2;
  }
  const std::string command = argv[i];
  const std::vector<std::string> args(argv + i + 1, argv + argc);
  if (command == "complete") return RunComplete(args);
  if (kvmem::IsRemoteCommand(command)) return kvmem::RunRemoteCommand(command, global_args, args);
  if (command == "--help" || command == "-h" || command == "help") {
    PrintUsage(stdout);
    return 0;
  }
  return Fail("unknown command \"" + command + "\"\n(kvmem help shows the usage)");
}
