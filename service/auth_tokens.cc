#include "service/auth_tokens.h"

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvmem {
namespace {

bool IsTokenCharacter(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         std::string_view("._~+/=-").find(c) != std::string_view::npos;
}

bool IsWellFormed(absl::string_view s) {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s) {
    if (!IsTokenCharacter(c)) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read the auth token file \"", path, "\""));
  }
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<TokenTable> table = Parse(text.str());
  if (!table.ok()) {
    return absl::Status(table.status().code(), absl::StrCat(path, ": ", table.status().message()));
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::Parse(std::string_view text) {
  TokenTable table;
  int line_number = 0;
  // Debian's abseil has its own string_view, distinct from std::string_view.
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_number;
    if (size_t hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    const bool read_only = fields.size() == 3 && fields[2] == "read-only";
    if ((fields.size() != 2 && !read_only) || !IsWellFormed(fields[0]) ||
        !IsWellFormed(fields[1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", line_number, ": expected \"TOKEN TENANT [read-only]\" with 1-128 characters ",
          "of [A-Za-z0-9._~+/=-] each"));
    }
    auto [it, inserted] = table.callers_.emplace(
        std::string(fields[0]), Caller{.tenant = std::string(fields[1]), .read_only = read_only});
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line_number, ": this token already appeared on an earlier line"));
    }
  }
  if (table.callers_.empty()) {
    return absl::InvalidArgumentError("no tokens: add lines \"TOKEN TENANT\"");
  }
  return table;
}

absl::StatusOr<Caller> TokenTable::Authenticate(const std::string_view* authorization) const {
  if (authorization == nullptr) {
    return absl::UnauthenticatedError(
        "this server requires authentication: send \"authorization: Bearer TOKEN\" metadata");
  }
  constexpr absl::string_view kScheme = "Bearer ";
  const absl::string_view header(authorization->data(), authorization->size());
  if (!absl::StartsWithIgnoreCase(header, kScheme)) {
    return absl::UnauthenticatedError("the authorization metadata must be \"Bearer TOKEN\"");
  }
  const absl::string_view token = absl::StripAsciiWhitespace(header.substr(kScheme.size()));
  auto it = callers_.find(std::string_view(token.data(), token.size()));
  if (it == callers_.end()) {
    return absl::UnauthenticatedError("unknown bearer token; check the token you were given");
  }
  return it->second;
}

}  // namespace kvmem
