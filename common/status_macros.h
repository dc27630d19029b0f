// Early-return helpers for absl::Status / absl::StatusOr.
#ifndef MUONPS_COMMON_STATUS_MACROS_H_
#define MUONPS_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MUONPS_STATUS_CONCAT_INNER(a, b) a##b
#define MUONPS_STATUS_CONCAT(a, b) MUONPS_STATUS_CONCAT_INNER(a, b)

// Returns the status of `expr` from the enclosing function when it is not OK.
#define MUONPS_RETURN_IF_ERROR(expr)                                           \
  do {                                                                         \
    if (absl::Status _muonps_st = (expr); !_muonps_st.ok()) return _muonps_st; \
  } while (0)

// `MUONPS_ASSIGN_OR_RETURN(auto x, StatusOrExpr());`
// `lhs` may be a declaration, so it cannot be put in parentheses.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define MUONPS_ASSIGN_OR_RETURN(lhs, expr)                       \
  auto MUONPS_STATUS_CONCAT(_muonps_or_, __LINE__) = (expr);     \
  if (!MUONPS_STATUS_CONCAT(_muonps_or_, __LINE__).ok())         \
    return MUONPS_STATUS_CONCAT(_muonps_or_, __LINE__).status(); \
  lhs = std::move(*MUONPS_STATUS_CONCAT(_muonps_or_, __LINE__))
// NOLINTEND(bugprone-macro-parentheses)

#endif  // MUONPS_COMMON_STATUS_MACROS_H_
