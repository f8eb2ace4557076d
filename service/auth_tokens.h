// Bearer-token authentication: which tenant a call acts for.
//
// The token file (kvmemd --auth-tokens FILE) holds one token per line:
//   TOKEN TENANT [read-only]
// '#' starts a comment; blank lines are skipped. Tokens and tenants are 1-128 characters of
// [A-Za-z0-9._~+/=-]; a token appears once. A read-only token may read sessions and
// generate with `discard`, and gets PERMISSION_DENIED for anything that changes a session.
#ifndef KVMEM_SERVICE_AUTH_TOKENS_H_
#define KVMEM_SERVICE_AUTH_TOKENS_H_

#include <map>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace kvmem {

// Who is calling. The tenant namespaces every session; "" when authentication is off.
struct Caller {
  std::string tenant;
  bool read_only = false;
};

class TokenTable {
 public:
  // NOT_FOUND when the file cannot be read; INVALID_ARGUMENT (with the line number) for a
  // malformed line, a duplicate token or a file without tokens.
  static absl::StatusOr<TokenTable> Load(const std::string& path);
  static absl::StatusOr<TokenTable> Parse(std::string_view text);

  // `authorization` is the value of the call's "authorization" metadata, or null when the
  // call has none. UNAUTHENTICATED when it is missing, not "Bearer TOKEN", or unknown.
  absl::StatusOr<Caller> Authenticate(const std::string_view* authorization) const;

  size_t size() const { return callers_.size(); }

 private:
  std::map<std::string, Caller, std::less<>> callers_;  // token -> caller
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_AUTH_TOKENS_H_
