// exp(x) for x <= 0 in straight-line float and integer arithmetic, on eight
// lanes at a time with GCC/Clang vector extensions: std::exp does not
// vectorise, and this compiles to AVX2 or SSE2 code as the target allows.
// Relative error below 2e-7 on [-87, 0]; callers clamp inputs at -87 (the
// result there, about 1.6e-38, is what they count as zero).
#pragma once

#include <cstdint>

namespace selfheal {

typedef float Float8 __attribute__((vector_size(32)));
typedef std::int32_t Int8 __attribute__((vector_size(32)));

inline Float8 exp_nonpositive(Float8 x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23
  // n = round(x / ln 2) by the add-magic trick: no floor(), no branch.
  const Float8 shifted = x * log2e + round_magic;
  const Float8 n = shifted - round_magic;
  const Int8 exponent = reinterpret_cast<Int8>(shifted) - 0x4B400000;  // == n
  const Float8 r = (x - n * ln2_hi) - n * ln2_lo;  // |r| <= ln2 / 2
  Float8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * reinterpret_cast<Float8>((exponent + 127) << 23);
}

inline Float8 load8(const float* data) {
  Float8 v;
  __builtin_memcpy(&v, data, sizeof(v));
  return v;
}

inline void store8(float* data, Float8 v) { __builtin_memcpy(data, &v, sizeof(v)); }

inline Float8 max8(Float8 a, Float8 b) { return a > b ? a : b; }

inline float sum8(Float8 v) {
  float total = 0.f;
  for (int lane = 0; lane < 8; ++lane) total += v[lane];
  return total;
}

inline float exp_nonpositive(float x) {
  Float8 v = {x, 0, 0, 0, 0, 0, 0, 0};
  return exp_nonpositive(v)[0];
}

}  // namespace selfheal
