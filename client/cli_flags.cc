#include "client/cli_flags.h"

#include <algorithm>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

template <typename T>
absl::Status ParseNumber(const CliArgs& args, const std::string& name, T* out) {
  if (args.values.count(name) == 0) return absl::OkStatus();
  const std::string text = args.Get(name);
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtof(text, out);
  } else {
    ok = absl::SimpleAtoi(text, out);
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number, got \"", text, "\""));
  }
  return absl::OkStatus();
}

}  // namespace

std::string CliArgs::Get(const std::string& name, const std::string& fallback) const {
  auto it = values.find(name);
  return it == values.end() ? fallback : it->second;
}

std::vector<std::string> CliArgs::All(const std::string& name) const {
  std::vector<std::string> out;
  for (auto [it, end] = values.equal_range(name); it != end; ++it) out.push_back(it->second);
  return out;
}

absl::Status CliArgs::GetInt(const std::string& name, int* out) const {
  return ParseNumber(*this, name, out);
}
absl::Status CliArgs::GetInt64(const std::string& name, int64_t* out) const {
  return ParseNumber(*this, name, out);
}
absl::Status CliArgs::GetUint64(const std::string& name, uint64_t* out) const {
  return ParseNumber(*this, name, out);
}
absl::Status CliArgs::GetFloat(const std::string& name, float* out) const {
  return ParseNumber(*this, name, out);
}

absl::Status ParseCliArgs(const std::vector<std::string>& args,
                          const std::vector<std::string>& value_flags,
                          const std::vector<std::string>& switch_flags, CliArgs* out) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      out->positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (Contains(switch_flags, name)) {
      if (eq != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      }
      out->switches.insert(name);
      continue;
    }
    if (!Contains(value_flags, name)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (eq == std::string::npos) {
      if (i + 1 == args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    out->values.emplace(name, value);
  }
  return absl::OkStatus();
}

}  // namespace kvmem
