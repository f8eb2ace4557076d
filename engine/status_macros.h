// Status helpers shared by every layer of kvmem.
//
// The installed abseil (20220623) has no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so the project
// defines its own here, once. Broken invariants (programming errors, never bad input) abort
// through KVMEM_CHECK with file:line; they are not statuses.
#ifndef KVMEM_ENGINE_STATUS_MACROS_H_
#define KVMEM_ENGINE_STATUS_MACROS_H_

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVMEM_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::absl::Status kvmem_status_ = (expr);         \
    if (!kvmem_status_.ok()) return kvmem_status_; \
  } while (0)

#define KVMEM_STATUS_CONCAT_INNER_(a, b) a##b
#define KVMEM_STATUS_CONCAT_(a, b) KVMEM_STATUS_CONCAT_INNER_(a, b)

#define KVMEM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()

// KVMEM_ASSIGN_OR_RETURN(auto x, MakeX()); declares x or returns MakeX()'s error.
#define KVMEM_ASSIGN_OR_RETURN(lhs, rexpr) \
  KVMEM_ASSIGN_OR_RETURN_IMPL_(KVMEM_STATUS_CONCAT_(kvmem_statusor_, __LINE__), lhs, rexpr)

#define KVMEM_CHECK(cond)                                                             \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#endif  // KVMEM_ENGINE_STATUS_MACROS_H_
