// Pieces of the adapter activations on eight float lanes, with GCC/Clang
// vector extensions like fast_exp.h, for CPU loops: the scalar erff/expf of
// activation.h cost about 10 ns a value, most of a small adapter's time.
// erf is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the
// formula of ATen's vectorised CPU GELU, so GELU's errors are eager
// PyTorch's (a few float32 roundings, absolute: relative ones grow where the
// far negative tail is tiny); exp is exp_nonpositive (relative error below
// 2e-7).
#pragma once

#include "selfheal/fast_exp.h"

namespace selfheal {

// exp(-h^2 / 2): GELU's erf(h / sqrt 2) and its derivative's density share it.
inline Float8 gaussian8(Float8 h) {
  const Float8 floor = Float8{} - 87.f;
  return exp_nonpositive(max8(-0.5f * h * h, floor));
}

// Phi(h) = (1 + erf(h / sqrt 2)) / 2, given gaussian8(h).
inline Float8 normal_cdf8(Float8 h, Float8 gaussian) {
  const Float8 zero = {};
  const Float8 magnitude = (h < zero ? -h : h) * 0.70710678118654752f;
  const Float8 t = 1.f / (1.f + 0.3275911f * magnitude);
  Float8 poly = t * 1.061405429f - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const Float8 erf_magnitude = 1.f - poly * t * gaussian;
  return 0.5f * (1.f + (h < zero ? -erf_magnitude : erf_magnitude));
}

// 1 / (1 + exp(-h)), from exp(-|h|) so that no exponent is positive. Below
// h = -87 (where exp is clamped) it is exactly 0, as 1 / (1 + expf(-h)) is
// once expf overflows: SiLU h * sigmoid(h) is then -0, and NaN at -inf, the
// values of at::silu.
inline Float8 sigmoid8(Float8 h) {
  const Float8 zero = {};
  const Float8 floor = Float8{} - 87.f;
  const Float8 e = exp_nonpositive(max8(h < zero ? h : -h, floor));
  const Float8 inverse = 1.f / (1.f + e);
  return h < floor ? zero : (h < zero ? e * inverse : inverse);
}

// max(h, 0) that keeps a NaN (at::relu's semantics: NaN in, NaN out).
inline Float8 relu8(Float8 h) {
  const Float8 zero = {};
  return h < zero ? zero : h;
}

}  // namespace selfheal
