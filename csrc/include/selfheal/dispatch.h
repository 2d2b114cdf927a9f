// Dtype dispatch for kernels that take float32, float16 and bfloat16 only:
// unlike AT_DISPATCH_FLOATING_TYPES_AND2 it instantiates no float64 kernel
// that the argument checks would never let through (nvcc time saved).
#pragma once

#include <ATen/Dispatch.h>

#define SELFHEAL_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
