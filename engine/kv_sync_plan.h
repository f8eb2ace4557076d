// How a device copy of one KV head catches up with the host's entries: which rows it keeps in
// place, which it gathers, and which it must upload. Pure host logic, so the CUDA backend's
// bookkeeping is tested without a GPU.
#ifndef KVMEM_ENGINE_KV_SYNC_PLAN_H_
#define KVMEM_ENGINE_KV_SYNC_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace kvmem {

// The device copy holds `mirrored` (ascending positions, one row each); the host now holds
// `wanted` (ascending). An entry the copy already has keeps its row's data: a position's key
// and value never change within one cache (rolled-back positions leave `wanted` before they
// are computed again, and every sync sees that).
struct KvSyncPlan {
  // Rows [0, keep) of the copy stay where they are, in order, and are wanted[0, keep).
  int64_t keep = 0;
  // Indices into `wanted` of the entries the copy lacks, ascending.
  std::vector<int64_t> uploads;
  // False: wanted = rows [0, keep) followed by the uploads; the copy is truncated to `keep`
  // rows and upload u lands at row keep + u.
  // True: the head is rebuilt by a gather: upload u is first placed at row mirrored.size() + u
  // (past the copy's rows), then wanted entry i is gathered from row sources[i].
  bool gather = false;
  std::vector<int32_t> sources;  // (wanted.size()) when gather

  bool unchanged(int64_t mirrored_size) const {
    return !gather && uploads.empty() && keep == mirrored_size;
  }
};

KvSyncPlan PlanKvSync(absl::Span<const int64_t> mirrored, absl::Span<const int64_t> wanted);

}  // namespace kvmem

#endif  // KVMEM_ENGINE_KV_SYNC_PLAN_H_
