// exp(x) for x <= 0 in straight-line float and integer arithmetic, so loops
// that call it vectorise (std::exp does not). Relative error below 2e-7 on
// [-87, 0]; inputs below -87 are clamped there by the callers (the result,
// about 1.6e-38, is what they count as zero).
#pragma once

#include <cstdint>
#include <cstring>

namespace selfheal {

inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
  // n = round(x / ln 2) by the add-magic trick: no floor(), no branch.
  const float shifted = x * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  std::int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const std::int32_t exponent = shifted_bits - 0x4B400000;  // == (int) n
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;           // |r| <= ln2 / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t scale_bits = (exponent + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

}  // namespace selfheal
