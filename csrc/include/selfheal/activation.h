// Adapter activations and their derivatives, shared by the CPU and CUDA
// kernels so both compute the same function.
#pragma once

#include <cmath>

#include "selfheal/checks.h"

#if defined(__CUDACC__)
#define SELFHEAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SELFHEAL_HOST_DEVICE inline
#endif

namespace selfheal {

// Exact (erf) GELU, as torch.nn.functional.gelu computes by default. The
// float64 overloads serve float64 inputs on the CPU (gradcheck).
SELFHEAL_HOST_DEVICE float activate(Activation act, float h) {
  switch (act) {
    case Activation::kRelu:
      return h < 0.f ? 0.f : h;  // NaN stays NaN, as at::relu
    case Activation::kGelu:
      return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case Activation::kSilu:
      return h / (1.f + expf(-h));
    case Activation::kIdentity:
    default:
      return h;
  }
}

SELFHEAL_HOST_DEVICE float activate_grad(Activation act, float h) {
  switch (act) {
    case Activation::kRelu:
      return h <= 0.f ? 0.f : 1.f;  // as at::threshold_backward
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.f + erff(h * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * h * h);
      return cdf + h * pdf;
    }
    case Activation::kSilu: {
      const float sig = 1.f / (1.f + expf(-h));
      return sig * (1.f + h * (1.f - sig));
    }
    case Activation::kIdentity:
    default:
      return 1.f;
  }
}

SELFHEAL_HOST_DEVICE double activate(Activation act, double h) {
  switch (act) {
    case Activation::kRelu:
      return h < 0.0 ? 0.0 : h;
    case Activation::kGelu:
      return 0.5 * h * (1.0 + erf(h * 0.70710678118654752));
    case Activation::kSilu:
      return h / (1.0 + exp(-h));
    case Activation::kIdentity:
    default:
      return h;
  }
}

SELFHEAL_HOST_DEVICE double activate_grad(Activation act, double h) {
  switch (act) {
    case Activation::kRelu:
      return h <= 0.0 ? 0.0 : 1.0;
    case Activation::kGelu: {
      const double cdf = 0.5 * (1.0 + erf(h * 0.70710678118654752));
      const double pdf = 0.39894228040143268 * exp(-0.5 * h * h);
      return cdf + h * pdf;
    }
    case Activation::kSilu: {
      const double sig = 1.0 / (1.0 + exp(-h));
      return sig * (1.0 + h * (1.0 - sig));
    }
    case Activation::kIdentity:
    default:
      return 1.0;
  }
}

// act(h) and act'(h) together, sharing the erf / exp of GELU and SiLU. One
// overload per type, like the functions above: on the host an unqualified
// erf(float) is the double one.
SELFHEAL_HOST_DEVICE void activate_with_grad(Activation act, float h, float* value, float* grad) {
  switch (act) {
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.f + erff(h * 0.70710678118654752f));
      *value = h * cdf;
      *grad = cdf + h * 0.39894228040143268f * expf(-0.5f * h * h);
      return;
    }
    case Activation::kSilu: {
      const float sig = 1.f / (1.f + expf(-h));
      *value = h * sig;
      *grad = sig * (1.f + h * (1.f - sig));
      return;
    }
    default:
      *value = activate(act, h);
      *grad = activate_grad(act, h);
  }
}

SELFHEAL_HOST_DEVICE void activate_with_grad(Activation act, double h, double* value,
                                             double* grad) {
  switch (act) {
    case Activation::kGelu: {
      const double cdf = 0.5 * (1.0 + erf(h * 0.70710678118654752));
      *value = h * cdf;
      *grad = cdf + h * 0.39894228040143268 * exp(-0.5 * h * h);
      return;
    }
    case Activation::kSilu: {
      const double sig = 1.0 / (1.0 + exp(-h));
      *value = h * sig;
      *grad = sig * (1.0 + h * (1.0 - sig));
      return;
    }
    default:
      *value = activate(act, h);
      *grad = activate_grad(act, h);
  }
}

}  // namespace selfheal
