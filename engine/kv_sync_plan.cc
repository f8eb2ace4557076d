#include "engine/kv_sync_plan.h"

#include "engine/status_macros.h"

namespace kvmem {

KvSyncPlan PlanKvSync(absl::Span<const int64_t> mirrored, absl::Span<const int64_t> wanted) {
  KvSyncPlan plan;
  const int64_t m = static_cast<int64_t>(mirrored.size());
  const int64_t n = static_cast<int64_t>(wanted.size());
  // The longest common prefix stays in place.
  while (plan.keep < m && plan.keep < n && mirrored[plan.keep] == wanted[plan.keep]) ++plan.keep;
  // Merge-walk the rest: each wanted entry is either a row of the copy or an upload.
  std::vector<int32_t> sources(n);
  for (int64_t i = 0; i < plan.keep; ++i) sources[i] = static_cast<int32_t>(i);
  int64_t j = plan.keep;
  bool in_place = true;  // every entry past `keep` is an upload
  for (int64_t i = plan.keep; i < n; ++i) {
    KVMEM_CHECK(i == 0 || wanted[i] > wanted[i - 1]);
    while (j < m && mirrored[j] < wanted[i]) ++j;
    if (j < m && mirrored[j] == wanted[i]) {
      sources[i] = static_cast<int32_t>(j++);
      in_place = false;
    } else {
      sources[i] = static_cast<int32_t>(m + static_cast<int64_t>(plan.uploads.size()));
      plan.uploads.push_back(i);
    }
  }
  if (!in_place) {
    plan.gather = true;
    plan.sources = std::move(sources);
  }
  return plan;
}

}  // namespace kvmem
