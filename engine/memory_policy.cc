#include "engine/memory_policy.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace kvmem {
namespace {

std::vector<int64_t> All(int64_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

class FullPolicy : public MemoryPolicy {
 public:
  const char* name() const override { return "full"; }
  std::vector<std::vector<int64_t>> Select(const TurnView& turn) const override {
    const KvCache& kv = *turn.kv;
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) keep.push_back(All(kv.head(l, g).size()));
    }
    return keep;
  }
};

// StreamingLLM: the first `sinks` entries and the most recent budget - sinks.
class WindowPolicy : public MemoryPolicy {
 public:
  explicit WindowPolicy(const MemoryOptions& o) : budget_(o.budget), sinks_(o.sink_tokens) {}
  const char* name() const override { return "window"; }
  std::vector<std::vector<int64_t>> Select(const TurnView& turn) const override {
    const KvCache& kv = *turn.kv;
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      for (int g = 0; g < kv.num_kv_heads(); ++g) {
        const int64_t n = kv.head(l, g).size();
        if (n <= budget_) {
          keep.push_back(All(n));
          continue;
        }
        std::vector<int64_t> k;
        for (int64_t i = 0; i < sinks_; ++i) k.push_back(i);
        for (int64_t i = n - (budget_ - sinks_); i < n; ++i) k.push_back(i);
        keep.push_back(std::move(k));
      }
    }
    return keep;
  }

 private:
  int64_t budget_;
  int64_t sinks_;
};

class SnapKvPolicy : public MemoryPolicy {
 public:
  explicit SnapKvPolicy(const MemoryOptions& o)
      : options_{.window = o.window, .kernel = o.kernel, .pooling = o.pooling, .budget = o.budget} {}
  const char* name() const override { return "snapkv"; }
  int observe_window() const override { return options_.window; }
  std::vector<std::vector<int64_t>> Select(const TurnView& turn) const override {
    const KvCache& kv = *turn.kv;
    const int w = static_cast<int>(std::min<int64_t>(turn.observed, turn.new_tokens));
    KVMEM_CHECK(w == turn.observed && w > 0);
    std::vector<std::vector<int64_t>> keep;
    for (int l = 0; l < kv.num_layers(); ++l) {
      std::vector<const HeadKv*> heads;
      for (int g = 0; g < kv.num_kv_heads(); ++g) heads.push_back(&kv.head(l, g));
      auto layer_keep = SelectSnapKv(options_, (*turn.observed_queries)[l].data(), turn.num_heads,
                                     w, heads, turn.sliding_window);
      for (auto& k : layer_keep) keep.push_back(std::move(k));
    }
    return keep;
  }

 private:
  SnapKvOptions options_;
};

}  // namespace

absl::Status ValidateMemoryOptions(const MemoryOptions& o) {
  if (o.policy == "full") return absl::OkStatus();
  if (o.policy == "snapkv") {
    return ValidateSnapKvOptions(
        {.window = o.window, .kernel = o.kernel, .pooling = o.pooling, .budget = o.budget});
  }
  if (o.policy == "window") {
    if (o.sink_tokens < 0 || o.budget <= o.sink_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "window policy needs 0 <= sink tokens (", o.sink_tokens, ") < hot budget (", o.budget,
          ")"));
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown memory policy \"", o.policy,
                                                 "\": use full, snapkv or window"));
}

absl::StatusOr<std::unique_ptr<MemoryPolicy>> MakeMemoryPolicy(const MemoryOptions& o) {
  KVMEM_RETURN_IF_ERROR(ValidateMemoryOptions(o));
  if (o.policy == "full") return std::unique_ptr<MemoryPolicy>(new FullPolicy());
  if (o.policy == "window") return std::unique_ptr<MemoryPolicy>(new WindowPolicy(o));
  return std::unique_ptr<MemoryPolicy>(new SnapKvPolicy(o));
}

}  // namespace kvmem
