// Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
#ifndef KVMEM_ENGINE_SAMPLER_H_
#define KVMEM_ENGINE_SAMPLER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvmem {

struct SamplingParams {
  // Default: 0 (greedy: the highest logit, lower id on ties). Otherwise softmax(logits / T).
  float temperature = 0.0f;
  // Default: 0 (off). Keep only the k most likely tokens.
  int top_k = 0;
  // Default: 1 (off). Keep the smallest set of most likely tokens whose mass reaches top_p.
  float top_p = 1.0f;
  // Default: 0. Same seed, same model, same prompt: same tokens.
  uint64_t seed = 0;
  // Default: 256. Tokens to generate at most.
  int max_tokens = 256;
  // Default: none. Generation stops before the first occurrence of any of these strings;
  // the stop string itself is not returned.
  std::vector<std::string> stop;
  // Default: false. Keep going past an end-of-sequence token.
  bool ignore_eos = false;
};

// INVALID_ARGUMENT, naming the field, for values out of range.
absl::Status ValidateSamplingParams(const SamplingParams& params);

// A deterministic generator (xoshiro256**, seeded through splitmix64): the same on every
// platform, unlike std:: distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t Next();
  double Uniform();  // [0, 1) with 53 random bits
 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // Picks a token from `logits` (vocab entries).
  int Sample(const float* logits, int vocab);

 private:
  SamplingParams params_;
  Rng rng_;
  std::vector<std::pair<float, int>> candidates_;
};

}  // namespace kvmem

#endif  // KVMEM_ENGINE_SAMPLER_H_
