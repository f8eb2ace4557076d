// Command-line arguments of `kvmem` subcommands: positionals, "--name VALUE" (or
// "--name=VALUE") flags that may repeat, and boolean "--name" switches.
#ifndef KVMEM_CLIENT_CLI_FLAGS_H_
#define KVMEM_CLIENT_CLI_FLAGS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvmem {

struct CliArgs {
  std::vector<std::string> positional;
  std::multimap<std::string, std::string> values;
  std::set<std::string> switches;

  bool Has(const std::string& name) const {
    return values.count(name) > 0 || switches.count(name) > 0;
  }
  // The first value of --name, or `fallback` when absent.
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  // Every value of --name, in order.
  std::vector<std::string> All(const std::string& name) const;
  // Parses --name as a number into *out; leaves *out alone when absent. INVALID_ARGUMENT
  // naming the flag when the value is not a number of that type.
  absl::Status GetInt(const std::string& name, int* out) const;
  absl::Status GetInt64(const std::string& name, int64_t* out) const;
  absl::Status GetUint64(const std::string& name, uint64_t* out) const;
  absl::Status GetFloat(const std::string& name, float* out) const;
};

// Parses `args` against the allowed names (without "--"). INVALID_ARGUMENT for an unknown
// flag, a value flag without a value, or a value given to a switch.
absl::Status ParseCliArgs(const std::vector<std::string>& args,
                          const std::vector<std::string>& value_flags,
                          const std::vector<std::string>& switch_flags, CliArgs* out);

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CLI_FLAGS_H_
