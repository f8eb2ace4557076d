// `kvmem`: the command-line tool. Subcommands:
//   complete  offline completion with the in-process engine (no server needed)
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/cpu_backend.h"
#include "engine/generate.h"
#include "engine/model.h"

namespace {

constexpr char kUsage[] =
    "usage: kvmem complete [--model DIR] --prompt TEXT [--max-tokens N] [--temperature T]\n"
    "                      [--top-p P] [--top-k K] [--seed S] [--stop S]... [--threads N]\n"
    "Prints only the generated continuation. The model is --model, else $KVMEM_MODEL,\n"
    "else ../shared/models/stories260K beside the project root.\n";

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvmem: %s\n", message.c_str());
  return 2;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvmem: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

// Flags as --name value pairs; repeated flags keep every value.
struct Flags {
  std::multimap<std::string, std::string> values;
  std::string Get(const std::string& name, const std::string& fallback = "") const {
    auto it = values.find(name);
    return it == values.end() ? fallback : it->second;
  }
  std::vector<std::string> All(const std::string& name) const {
    std::vector<std::string> out;
    for (auto [it, end] = values.equal_range(name); it != end; ++it) out.push_back(it->second);
    return out;
  }
};

bool ParseFlags(int argc, char** argv, int first, const std::vector<std::string>& known,
                Flags* flags, std::string* error) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      *error = "unexpected argument " + arg;
      return false;
    }
    std::string name = arg.substr(2), value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      *error = "flag --" + name + " needs a value";
      return false;
    }
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      *error = "unknown flag --" + name;
      return false;
    }
    flags->values.emplace(name, value);
  }
  return true;
}

template <typename T>
bool ParseNumber(const Flags& flags, const std::string& name, T* out, std::string* error) {
  std::string text = flags.Get(name);
  if (text.empty()) return true;
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtof(text, out);
  } else {
    ok = absl::SimpleAtoi(text, out);
  }
  if (!ok) *error = "--" + name + " must be a number, got \"" + text + "\"";
  return ok;
}

int RunComplete(int argc, char** argv) {
  Flags flags;
  std::string error;
  if (!ParseFlags(argc, argv, 2,
                  {"model", "prompt", "max-tokens", "temperature", "top-p", "top-k", "seed",
                   "stop", "threads"},
                  &flags, &error)) {
    return Fail(error + "\n" + kUsage);
  }
  if (flags.values.count("prompt") == 0) return Fail(std::string("--prompt is required\n") + kUsage);
  kvmem::SamplingParams params;
  int threads = 0;
  if (!ParseNumber(flags, "max-tokens", &params.max_tokens, &error) ||
      !ParseNumber(flags, "temperature", &params.temperature, &error) ||
      !ParseNumber(flags, "top-p", &params.top_p, &error) ||
      !ParseNumber(flags, "top-k", &params.top_k, &error) ||
      !ParseNumber(flags, "seed", &params.seed, &error) ||
      !ParseNumber(flags, "threads", &threads, &error)) {
    return Fail(error);
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
  auto result = kvmem::Complete(**model, backend, flags.Get("prompt"), params,
                                [](std::string_view delta) {
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
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  std::string command = argv[1];
  if (command == "complete") return RunComplete(argc, argv);
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  return Fail("unknown command \"" + command + "\"\n" + kUsage);
}
