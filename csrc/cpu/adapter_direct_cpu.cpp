// CPU adapter, direct loops for small problems.
//
// Below a few million multiply-adds the tiled path's time is mostly its fixed
// costs: tens of ATen calls per tile (products, views, copies, the
// activation, allocations), each some microseconds of dispatch. Here the
// adapter is plain loops over raw pointers, with no ATen call after the
// outputs are allocated. Arithmetic is float32 (float16/bfloat16 converted per
// element), float64 for float64 inputs.
//
// Every product is written as one of two loops along a contiguous run, which
// the compiler vectorises: accumulate_rows (y += sum_j coef_j * row_j) and
// accumulate_dots (out_j += dot(v, row_j)). Channels-last rows are used in
// place (positions are rows, channels contiguous); a channels-first block of
// positions is gathered channel-major, [C, width] (positions contiguous), and
// its results are scattered back.
//
// Weight gradients are summed within a block in a fixed order, over a chunk's
// blocks in order and over the chunks in chunk order; the chunks depend on the
// problem's size only, so results are bit-identical at any thread count.
#include "adapter_direct_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "selfheal/activation.h"
#include "selfheal/activation_float8.h"
#include "selfheal/vector_clones.h"

namespace selfheal {
namespace {

// Positions per block ("width"): kMaxBlock, long enough for vector loops
// along the positions of a channels-first block, and fewer for layers of more
// than kBlockValues / kMaxBlock channels, so that a block [C, width] stays in
// L2 and the scratch stays small however wide the layer is.
constexpr int64_t kMaxBlock = 64;
constexpr int64_t kMinBlock = 8;
constexpr int64_t kBlockValues = 65536;

// Problems up to kDirectMaxMultiplyAdds (one product each way, one pass) take
// the direct loops, low-rank ones up to kDirectMaxLowRank; see
// adapter_direct_fits.
constexpr int64_t kDirectMaxMultiplyAdds = int64_t{1} << 22;
constexpr int64_t kDirectMaxLowRank = int64_t{1} << 24;
constexpr int64_t kLowRankForward = 4;
constexpr int64_t kLowRankBackward = 8;

// Multiply-adds per chunk of blocks, the unit handed to a thread: some tens of
// microseconds of work, several times what handing it to a thread costs.
constexpr int64_t kChunkMultiplyAdds = int64_t{1} << 18;
constexpr int64_t kMaxChunks = 16;

int64_t multiply_adds(const AdapterShape& shape) {
  return shape.positions() * shape.rank * (shape.channels_in + shape.channels_out);
}

int64_t block_width(const AdapterShape& shape) {
  const int64_t widest = std::max(shape.channels_in, shape.channels_out);
  return std::clamp<int64_t>(kBlockValues / widest, kMinBlock, kMaxBlock);
}

int64_t block_count(const AdapterShape& shape) {
  const int64_t width = block_width(shape);
  return (shape.positions() + width - 1) / width;
}

// Fixed by the problem's size, never by the thread count.
int64_t chunk_count(const AdapterShape& shape) {
  const int64_t chunks = multiply_adds(shape) / kChunkMultiplyAdds;
  return std::max<int64_t>(1, std::min({chunks, kMaxChunks, block_count(shape)}));
}

// ---- vector loops ------------------------------------------------------------

// y[i] += sum over j < rows of coef[j * coef_stride] * block[j * row_stride + i]
// for i < count, four rows per pass over y (one load and store of y per four
// multiply-adds).
template <typename acc_t>
SELFHEAL_INLINE_INTO_CLONES void accumulate_rows(acc_t* __restrict__ y, const acc_t* coef,
                                                 int64_t coef_stride,
                                                 const acc_t* __restrict__ block,
                                                 int64_t row_stride, int64_t rows,
                                                 int64_t count) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const acc_t a0 = coef[j * coef_stride];
    const acc_t a1 = coef[(j + 1) * coef_stride];
    const acc_t a2 = coef[(j + 2) * coef_stride];
    const acc_t a3 = coef[(j + 3) * coef_stride];
    const acc_t* r0 = block + j * row_stride;
    const acc_t* r1 = r0 + row_stride;
    const acc_t* r2 = r1 + row_stride;
    const acc_t* r3 = r2 + row_stride;
    for (int64_t i = 0; i < count; ++i) {
      y[i] += (a0 * r0[i] + a1 * r1[i]) + (a2 * r2[i] + a3 * r3[i]);
    }
  }
  for (; j < rows; ++j) {
    const acc_t a = coef[j * coef_stride];
    const acc_t* r = block + j * row_stride;
    for (int64_t i = 0; i < count; ++i) y[i] += a * r[i];
  }
}

// 32 bytes of acc_t as a GCC/Clang vector: eight float or four double lanes.
template <typename acc_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename acc_t>
using Lanes = typename VectorOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = 32 / sizeof(acc_t);

template <typename acc_t>
SELFHEAL_INLINE_INTO_CLONES Lanes<acc_t> load_lanes(const acc_t* data) {
  Lanes<acc_t> v;
  std::memcpy(&v, data, sizeof(v));
  return v;
}

// The lanes' sum, halving in a fixed order.
template <typename acc_t>
SELFHEAL_INLINE_INTO_CLONES acc_t lane_sum(Lanes<acc_t> v) {
  for (int64_t half = kLanes<acc_t> / 2; half >= 1; half /= 2) {
    for (int64_t lane = 0; lane < half; ++lane) v[lane] += v[lane + half];
  }
  return v[0];
}

// out[j * out_stride] += sum over i < count of v[i] * block[j * row_stride + i]
// for j < rows: per row, one partial sum per vector lane (accumulators that
// stay in registers), then the lanes and the scalar tail in a fixed order;
// four rows per pass over v.
template <typename acc_t>
SELFHEAL_INLINE_INTO_CLONES void accumulate_dots(acc_t* out, int64_t out_stride,
                                                 const acc_t* __restrict__ v,
                                                 const acc_t* __restrict__ block,
                                                 int64_t row_stride, int64_t rows,
                                                 int64_t count) {
  const int64_t whole = count - count % kLanes<acc_t>;
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const acc_t* r0 = block + j * row_stride;
    const acc_t* r1 = r0 + row_stride;
    const acc_t* r2 = r1 + row_stride;
    const acc_t* r3 = r2 + row_stride;
    Lanes<acc_t> s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t i = 0; i < whole; i += kLanes<acc_t>) {
      const Lanes<acc_t> x = load_lanes(v + i);
      s0 += x * load_lanes(r0 + i);
      s1 += x * load_lanes(r1 + i);
      s2 += x * load_lanes(r2 + i);
      s3 += x * load_lanes(r3 + i);
    }
    acc_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (int64_t i = whole; i < count; ++i) {
      t0 += v[i] * r0[i];
      t1 += v[i] * r1[i];
      t2 += v[i] * r2[i];
      t3 += v[i] * r3[i];
    }
    out[j * out_stride] += lane_sum<acc_t>(s0) + t0;
    out[(j + 1) * out_stride] += lane_sum<acc_t>(s1) + t1;
    out[(j + 2) * out_stride] += lane_sum<acc_t>(s2) + t2;
    out[(j + 3) * out_stride] += lane_sum<acc_t>(s3) + t3;
  }
  for (; j < rows; ++j) {
    const acc_t* r = block + j * row_stride;
    Lanes<acc_t> s = {};
    for (int64_t i = 0; i < whole; i += kLanes<acc_t>) {
      s += load_lanes(v + i) * load_lanes(r + i);
    }
    acc_t t = 0;
    for (int64_t i = whole; i < count; ++i) t += v[i] * r[i];
    out[j * out_stride] += lane_sum<acc_t>(s) + t;
  }
}

template <typename acc_t>
SELFHEAL_INLINE_INTO_CLONES acc_t sum(const acc_t* __restrict__ a, int64_t count) {
  const int64_t whole = count - count % kLanes<acc_t>;
  Lanes<acc_t> s = {};
  for (int64_t i = 0; i < whole; i += kLanes<acc_t>) s += load_lanes(a + i);
  acc_t t = 0;
  for (int64_t i = whole; i < count; ++i) t += a[i];
  return lane_sum<acc_t>(s) + t;
}

// ---- activations ---------------------------------------------------------------

// x = f(x) on eight lanes at a time of x[0, count), the last lanes padded
// with zeros.
template <typename F>
SELFHEAL_INLINE_INTO_CLONES void map8(float* x, int64_t count, const F& f) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(x + i, f(load8(x + i)));
  if (i == count) return;
  const size_t bytes = (count - i) * sizeof(float);
  Float8 xv = {};
  std::memcpy(&xv, x + i, bytes);
  xv = f(xv);
  std::memcpy(x + i, &xv, bytes);
}

// f(x, y) updating both, as map8 above.
template <typename F>
SELFHEAL_INLINE_INTO_CLONES void map8(float* x, float* y, int64_t count, const F& f) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    Float8 xv = load8(x + i);
    Float8 yv = load8(y + i);
    f(xv, yv);
    store8(x + i, xv);
    store8(y + i, yv);
  }
  if (i == count) return;
  const size_t bytes = (count - i) * sizeof(float);
  Float8 xv = {};
  Float8 yv = {};
  std::memcpy(&xv, x + i, bytes);
  std::memcpy(&yv, y + i, bytes);
  f(xv, yv);
  std::memcpy(x + i, &xv, bytes);
  std::memcpy(y + i, &yv, bytes);
}

// h = act(h) in place. float32 on eight lanes (activation_float8.h); float64
// with activation.h's scalar functions, where gradcheck needs full precision.
SELFHEAL_INLINE_INTO_CLONES void activate_row(Activation act, float* h, int64_t count) {
  switch (act) {
    case Activation::kRelu:
      map8(h, count, [](Float8 v) { return relu8(v); });
      return;
    case Activation::kGelu:
      map8(h, count, [](Float8 v) { return v * normal_cdf8(v, gaussian8(v)); });
      return;
    case Activation::kSilu:
      map8(h, count, [](Float8 v) { return v * sigmoid8(v); });
      return;
    case Activation::kIdentity:
    default:
      return;
  }
}

SELFHEAL_INLINE_INTO_CLONES void activate_row(Activation act, double* h, int64_t count) {
  for (int64_t i = 0; i < count; ++i) h[i] = activate(act, h[i]);
}

// grad *= act'(h), then h = act(h), in place.
SELFHEAL_INLINE_INTO_CLONES void activate_with_grad_row(Activation act, float* h, float* grad,
                                                        int64_t count) {
  switch (act) {
    case Activation::kRelu:
      map8(h, grad, count, [](Float8& v, Float8& g) {
        const Float8 zero = {};
        g = v <= zero ? zero : g;  // as at::threshold_backward: a NaN passes
        v = relu8(v);
      });
      return;
    case Activation::kGelu:
      map8(h, grad, count, [](Float8& v, Float8& g) {
        const Float8 gaussian = gaussian8(v);
        const Float8 cdf = normal_cdf8(v, gaussian);
        g *= cdf + v * 0.39894228040143268f * gaussian;
        v *= cdf;
      });
      return;
    case Activation::kSilu:
      map8(h, grad, count, [](Float8& v, Float8& g) {
        const Float8 sig = sigmoid8(v);
        g *= sig * (1.f + v * (1.f - sig));
        v *= sig;
      });
      return;
    case Activation::kIdentity:
    default:
      return;
  }
}

SELFHEAL_INLINE_INTO_CLONES void activate_with_grad_row(Activation act, double* h,
                                                        double* grad, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    double slope;
    activate_with_grad(act, h[i], &h[i], &slope);
    grad[i] *= slope;
  }
}

// ---- weights -------------------------------------------------------------------

// A weight's values in acc_t, contiguous. Weights are small next to the
// problem, so one copy for every dtype is simpler than a float32 special case.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> acc_values(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* data = c.data_ptr<scalar_t>();
  return std::vector<acc_t>(data, data + c.numel());
}

template <typename acc_t>
std::vector<acc_t> transposed(const std::vector<acc_t>& m, int64_t rows, int64_t cols) {
  std::vector<acc_t> t(m.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = m[i * cols + j];
  }
  return t;
}

// [c_out, rank] up rows times the scale.
template <typename acc_t>
std::vector<acc_t> scaled_rows(std::vector<acc_t> up, const std::vector<acc_t>& scale,
                               int64_t rank) {
  for (size_t o = 0; o < scale.size(); ++o) {
    for (int64_t k = 0; k < rank; ++k) up[o * rank + k] *= scale[o];
  }
  return up;
}

template <typename acc_t>
struct ForwardWeights {
  const acc_t* down;   // [rank, c_in]
  const acc_t* bias;   // [rank], or null
  const acc_t* up_t;   // [rank, c_out]: (scale * up)^T
  const acc_t* shift;  // [c_out], or null
};

template <typename acc_t>
struct BackwardWeights {
  const acc_t* down;         // [rank, c_in]
  const acc_t* up_scaled_t;  // [rank, c_out]: (scale * up)^T
};

// Per-chunk sums of the weight gradients.
template <typename acc_t>
struct Partials {
  acc_t* g_t;    // [rank, c_out]: sum of act(h) grad_y^T, grad_up^T before the scale
  acc_t* shift;  // [c_out]
  acc_t* down;   // [rank, c_in]
  acc_t* bias;   // [rank]
  static int64_t size(const AdapterShape& shape) {
    return (shape.rank + 1) * shape.channels_out + shape.rank * (shape.channels_in + 1);
  }
  Partials(acc_t* data, const AdapterShape& shape)
      : g_t(data),
        shift(g_t + shape.rank * shape.channels_out),
        down(shift + shape.channels_out),
        bias(down + shape.rank * shape.channels_in) {}
};

// ---- channels-last: rows in place ---------------------------------------------

// count rows x [count, c_in] -> hidden [count, rank] and branch [count, c_out]
// = scale * up(act(h)) + shift, activated [count, rank] as scratch.
template <typename acc_t>
SELFHEAL_VECTOR_CLONES void forward_rows(const AdapterShape& shape, Activation act,
                                         const ForwardWeights<acc_t>& w, const acc_t* x,
                                         int64_t count, acc_t* hidden, acc_t* activated,
                                         acc_t* branch) {
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;
  for (int64_t i = 0; i < count; ++i) {
    acc_t* h = hidden + i * rank;
    for (int64_t k = 0; k < rank; ++k) h[k] = w.bias != nullptr ? w.bias[k] : acc_t(0);
    accumulate_dots(h, 1, x + i * c_in, w.down, c_in, rank, c_in);
  }
  std::copy(hidden, hidden + count * rank, activated);
  activate_row(act, activated, count * rank);
  for (int64_t i = 0; i < count; ++i) {
    acc_t* out = branch + i * c_out;
    if (w.shift != nullptr) {
      std::copy(w.shift, w.shift + c_out, out);
    } else {
      std::fill(out, out + c_out, acc_t(0));
    }
    accumulate_rows(out, activated + i * rank, 1, w.up_t, c_out, rank, c_out);
  }
}

// count rows of x [count, c_in], grad_y [count, c_out] and hidden [count,
// rank]: adds their weight gradients to sums and, when grad_x is given, writes
// it [count, c_in] (grad_y included when base is x). activated and grad_h are
// [count, rank] scratch.
template <typename acc_t>
SELFHEAL_VECTOR_CLONES void backward_rows(const AdapterShape& shape, Activation act,
                                          const BackwardWeights<acc_t>& w, const acc_t* x,
                                          const acc_t* g, const acc_t* hidden, int64_t count,
                                          acc_t* activated, acc_t* grad_h,
                                          const Partials<acc_t>& sums, bool base_is_x,
                                          acc_t* grad_x) {
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;
  std::fill(grad_h, grad_h + count * rank, acc_t(0));
  for (int64_t i = 0; i < count; ++i) {
    accumulate_dots(grad_h + i * rank, 1, g + i * c_out, w.up_scaled_t, c_out, rank, c_out);
  }
  std::copy(hidden, hidden + count * rank, activated);
  activate_with_grad_row(act, activated, grad_h, count * rank);
  for (int64_t k = 0; k < rank; ++k) {
    accumulate_rows(sums.g_t + k * c_out, activated + k, rank, g, c_out, count, c_out);
    accumulate_rows(sums.down + k * c_in, grad_h + k, rank, x, c_in, count, c_in);
    for (int64_t i = 0; i < count; ++i) sums.bias[k] += grad_h[i * rank + k];
  }
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t o = 0; o < c_out; ++o) sums.shift[o] += g[i * c_out + o];
  }
  if (grad_x == nullptr) return;
  for (int64_t i = 0; i < count; ++i) {
    acc_t* gx = grad_x + i * c_in;
    if (base_is_x) {
      std::copy(g + i * c_in, g + (i + 1) * c_in, gx);
    } else {
      std::fill(gx, gx + c_in, acc_t(0));
    }
    accumulate_rows(gx, grad_h + i * rank, 1, w.down, c_in, rank, c_in);
  }
}

// ---- channels-first: blocks gathered channel-major -----------------------------

// Calls visit(c, i, offset, run) for each run of positions [first, first +
// count) of a contiguous [n_outer, channels, spatial] tensor that lies in one
// sample: block column i onwards holds elements offset .. offset + run - 1 of
// channel c.
template <typename Visit>
void for_each_run(int64_t channels, int64_t spatial, int64_t first, int64_t count,
                  const Visit& visit) {
  for (int64_t i = 0; i < count;) {
    const int64_t n = (first + i) / spatial;
    const int64_t s = (first + i) % spatial;
    const int64_t run = std::min(count - i, spatial - s);
    for (int64_t c = 0; c < channels; ++c) visit(c, i, (n * channels + c) * spatial + s, run);
    i += run;
  }
}

// block [channels, width] = positions [first, first + count) of src.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* src, int64_t channels, int64_t spatial, int64_t first,
            int64_t count, int64_t width, acc_t* block) {
  for_each_run(channels, spatial, first, count,
               [&](int64_t c, int64_t i, int64_t offset, int64_t run) {
                 std::copy(src + offset, src + offset + run, block + c * width + i);
               });
}

// Positions [first, first + count) of dst = addend + block, or block alone
// when addend is null (addend has dst's geometry).
template <typename scalar_t, typename acc_t>
void scatter(const acc_t* block, int64_t width, const scalar_t* addend, int64_t channels,
             int64_t spatial, int64_t first, int64_t count, scalar_t* dst) {
  for_each_run(channels, spatial, first, count,
               [&](int64_t c, int64_t i, int64_t offset, int64_t run) {
                 const acc_t* from = block + c * width + i;
                 if (addend == nullptr) {
                   std::copy(from, from + run, dst + offset);
                   return;
                 }
                 for (int64_t j = 0; j < run; ++j) {
                   dst[offset + j] = static_cast<scalar_t>(
                       static_cast<acc_t>(addend[offset + j]) + from[j]);
                 }
               });
}

// One block of count positions: x_block [c_in, width] -> hidden rows [count,
// rank] and branch [c_out, width] = scale * up(act(h)) + shift, with
// activated [rank, width] as scratch.
template <typename acc_t>
SELFHEAL_VECTOR_CLONES void forward_block(const AdapterShape& shape, Activation act,
                                          const ForwardWeights<acc_t>& w,
                                          const acc_t* x_block, int64_t width,
                                          int64_t count, acc_t* hidden_rows,
                                          acc_t* activated, acc_t* branch) {
  const int64_t rank = shape.rank;
  for (int64_t k = 0; k < rank; ++k) {
    acc_t* h = activated + k * width;
    std::fill(h, h + count, w.bias != nullptr ? w.bias[k] : acc_t(0));
    accumulate_rows(h, w.down + k * shape.channels_in, 1, x_block, width,
                    shape.channels_in, count);
    for (int64_t i = 0; i < count; ++i) hidden_rows[i * rank + k] = h[i];
    activate_row(act, h, count);
  }
  for (int64_t o = 0; o < shape.channels_out; ++o) {
    acc_t* out = branch + o * width;
    std::fill(out, out + count, w.shift != nullptr ? w.shift[o] : acc_t(0));
    accumulate_rows(out, w.up_t + o, shape.channels_out, activated, width, rank, count);
  }
}

// One block of count positions: adds its weight gradients to sums and, when
// grad_x_block is given, writes grad_x [c_in, width] (grad_y included when
// base is x). activated and grad_h are [rank, width] scratch.
template <typename acc_t>
SELFHEAL_VECTOR_CLONES void backward_block(const AdapterShape& shape, Activation act,
                                           const BackwardWeights<acc_t>& w,
                                           const acc_t* x_block, const acc_t* g_block,
                                           int64_t width, const acc_t* hidden_rows,
                                           int64_t count,
                                           acc_t* activated, acc_t* grad_h,
                                           const Partials<acc_t>& sums, bool base_is_x,
                                           acc_t* grad_x_block) {
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;
  for (int64_t k = 0; k < rank; ++k) {
    acc_t* gh = grad_h + k * width;
    acc_t* a = activated + k * width;
    std::fill(gh, gh + count, acc_t(0));
    accumulate_rows(gh, w.up_scaled_t + k * c_out, 1, g_block, width, c_out, count);
    for (int64_t i = 0; i < count; ++i) a[i] = hidden_rows[i * rank + k];
    activate_with_grad_row(act, a, gh, count);
  }
  for (int64_t o = 0; o < c_out; ++o) {
    const acc_t* g = g_block + o * width;
    sums.shift[o] += sum(g, count);
    accumulate_dots(sums.g_t + o, c_out, g, activated, width, rank, count);
  }
  for (int64_t k = 0; k < rank; ++k) {
    const acc_t* gh = grad_h + k * width;
    sums.bias[k] += sum(gh, count);
    accumulate_dots(sums.down + k * c_in, 1, gh, x_block, width, c_in, count);
  }
  if (grad_x_block == nullptr) return;
  for (int64_t c = 0; c < c_in; ++c) {
    acc_t* gx = grad_x_block + c * width;
    if (base_is_x) {
      std::copy(g_block + c * width, g_block + c * width + count, gx);
    } else {
      std::fill(gx, gx + count, acc_t(0));
    }
    accumulate_rows(gx, w.down + c, c_in, grad_h, width, rank, count);
  }
}

// ---- driver --------------------------------------------------------------------

// Runs body(chunk, first_block, end_block) for each chunk, in parallel when
// there are several. The loops call no ATen op, so no thread-local state needs
// carrying to the workers.
template <typename Body>
void for_each_chunk(const AdapterShape& shape, const Body& body) {
  const int64_t blocks = block_count(shape);
  const int64_t chunks = chunk_count(shape);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      body(chunk, chunk * blocks / chunks, (chunk + 1) * blocks / chunks);
    }
  });
}

// Channels-last rows [first, first + count) of src as acc_t: src itself when
// it already is acc_t, else converted into buffer.
template <typename scalar_t, typename acc_t>
const acc_t* acc_rows(const scalar_t* src, int64_t channels, int64_t first, int64_t count,
                      acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src + first * channels;
  } else {
    std::copy(src + first * channels, src + (first + count) * channels, buffer);
    return buffer;
  }
}

// Where to compute channels-last output rows [first, ...): in dst itself when
// it is acc_t, else in buffer, which store_rows then converts into dst.
template <typename scalar_t, typename acc_t>
acc_t* acc_output_rows(scalar_t* dst, int64_t channels, int64_t first, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst + first * channels;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* buffer, int64_t channels, int64_t first, int64_t count,
                scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    std::copy(buffer, buffer + count * channels, dst + first * channels);
  }
}

}  // namespace

// Timed against the tiled path on a 2-core AVX2 machine at 1 and 2 threads
// (channels-last and channels-first, 16-1024 channels, ranks 4-16, 2^21-2^25
// multiply-adds): the direct loops were as fast or faster up to 2^22
// multiply-adds in every case, and 2-3x faster for ranks 4-8 or 16-64
// channels. Beyond that BLAS wins forward once channels are wide (256 and
// more at rank 8), but not at rank 4, and the tiled backward stays 2-4x
// slower up to rank 8 (its products have an inner dimension of r, and its
// per-tile activation-gradient passes dominate); measured up to 2^24.
bool adapter_direct_fits(const AdapterShape& shape, bool backward) {
  const int64_t low_rank = backward ? kLowRankBackward : kLowRankForward;
  const int64_t limit = shape.rank <= low_rank ? kDirectMaxLowRank : kDirectMaxMultiplyAdds;
  return multiply_adds(shape) <= limit;
}

std::tuple<at::Tensor, at::Tensor> adapter_forward_direct(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    Activation act, bool channels_first, const AdapterShape& shape) {
  const at::ScalarType acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty(adapter_output_sizes(x, shape.channels_out, channels_first),
                           x.options());
  at::Tensor hidden = at::empty({shape.positions(), shape.rank}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_forward_direct", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t rank = shape.rank;
        const int64_t c_in = shape.channels_in;
        const int64_t c_out = shape.channels_out;
        const std::vector<acc_t> down = acc_values<scalar_t, acc_t>(down_weight);
        const std::vector<acc_t> bias =
            down_bias.has_value() ? acc_values<scalar_t, acc_t>(*down_bias) : std::vector<acc_t>();
        const std::vector<acc_t> shift_values =
            shift.has_value() ? acc_values<scalar_t, acc_t>(*shift) : std::vector<acc_t>();
        std::vector<acc_t> up = acc_values<scalar_t, acc_t>(up_weight);
        if (scale.has_value()) up = scaled_rows(up, acc_values<scalar_t, acc_t>(*scale), rank);
        const std::vector<acc_t> up_t = transposed(up, c_out, rank);
        const ForwardWeights<acc_t> weights{down.data(),
                                            down_bias.has_value() ? bias.data() : nullptr,
                                            up_t.data(),
                                            shift.has_value() ? shift_values.data() : nullptr};
        const scalar_t* x_data = x.data_ptr<scalar_t>();
        const scalar_t* base_data = base.data_ptr<scalar_t>();
        scalar_t* y_data = y.data_ptr<scalar_t>();
        acc_t* hidden_data = hidden.data_ptr<acc_t>();
        const int64_t positions = shape.positions();
        const int64_t width = block_width(shape);
        const bool channels_last = shape.spatial == 1;
        for_each_chunk(shape, [&](int64_t, int64_t first_block, int64_t end_block) {
          // x block, activated, branch
          std::vector<acc_t> scratch((c_in + rank + c_out) * width);
          acc_t* x_block = scratch.data();
          acc_t* activated = x_block + c_in * width;
          acc_t* branch = activated + rank * width;
          for (int64_t b = first_block; b < end_block; ++b) {
            const int64_t first = b * width;
            const int64_t count = std::min(width, positions - first);
            acc_t* hidden_rows = hidden_data + first * rank;
            if (channels_last) {
              forward_rows(shape, act, weights, acc_rows(x_data, c_in, first, count, x_block),
                           count, hidden_rows, activated, branch);
              const scalar_t* base_rows = base_data + first * c_out;
              scalar_t* y_rows = y_data + first * c_out;
              for (int64_t j = 0; j < count * c_out; ++j) {
                y_rows[j] = static_cast<scalar_t>(static_cast<acc_t>(base_rows[j]) + branch[j]);
              }
            } else {
              gather(x_data, c_in, shape.spatial, first, count, width, x_block);
              forward_block(shape, act, weights, x_block, width, count, hidden_rows, activated,
                            branch);
              scatter(branch, width, base_data, c_out, shape.spatial, first, count, y_data);
            }
          }
        });
      });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_direct(const at::Tensor& grad_y, const at::Tensor& x,
                        const at::Tensor& hidden, const at::Tensor& down_weight,
                        const at::Tensor& up_weight,
                        const std::optional<at::Tensor>& scale, Activation act,
                        bool base_is_x, bool compute_grad_x, const AdapterShape& shape) {
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;
  const auto weight_options = down_weight.options();
  at::Tensor grad_x = compute_grad_x ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                     : at::empty({0}, x.options());
  at::Tensor grad_down = at::empty({rank, c_in}, weight_options);
  at::Tensor grad_bias = at::empty({rank}, weight_options);
  at::Tensor grad_up = at::empty({c_out, rank}, weight_options);
  at::Tensor grad_scale = at::empty({scale.has_value() ? c_out : 0}, weight_options);
  at::Tensor grad_shift = at::empty({c_out}, weight_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_backward_direct", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const std::vector<acc_t> down = acc_values<scalar_t, acc_t>(down_weight);
        const std::vector<acc_t> up = acc_values<scalar_t, acc_t>(up_weight);
        const std::vector<acc_t> scale_values =
            scale.has_value() ? acc_values<scalar_t, acc_t>(*scale) : std::vector<acc_t>();
        // d(loss)/d(act(h)) = grad_y @ (scale * up): fold the scale in once.
        const std::vector<acc_t> up_scaled_t =
            transposed(scale.has_value() ? scaled_rows(up, scale_values, rank) : up, c_out, rank);
        const BackwardWeights<acc_t> weights{down.data(), up_scaled_t.data()};
        const scalar_t* x_data = x.data_ptr<scalar_t>();
        const scalar_t* g_data = grad_y.data_ptr<scalar_t>();
        const acc_t* hidden_data = hidden.data_ptr<acc_t>();
        scalar_t* grad_x_data = compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
        const int64_t positions = shape.positions();
        const int64_t width = block_width(shape);
        const bool channels_last = shape.spatial == 1;
        const int64_t chunks = chunk_count(shape);
        const int64_t partial_size = Partials<acc_t>::size(shape);
        std::vector<acc_t> partials(chunks * partial_size, acc_t(0));

        for_each_chunk(shape, [&](int64_t chunk, int64_t first_block, int64_t end_block) {
          const Partials<acc_t> sums(partials.data() + chunk * partial_size, shape);
          // x block, grad_y block, activated, grad_h, grad_x block
          std::vector<acc_t> scratch((2 * c_in + c_out + 2 * rank) * width);
          acc_t* x_block = scratch.data();
          acc_t* g_block = x_block + c_in * width;
          acc_t* activated = g_block + c_out * width;
          acc_t* grad_h = activated + rank * width;
          acc_t* grad_x_block = grad_h + rank * width;
          for (int64_t b = first_block; b < end_block; ++b) {
            const int64_t first = b * width;
            const int64_t count = std::min(width, positions - first);
            const acc_t* hidden_rows = hidden_data + first * rank;
            if (channels_last) {
              acc_t* grad_x_rows =
                  compute_grad_x ? acc_output_rows(grad_x_data, c_in, first, grad_x_block)
                                 : nullptr;
              backward_rows(shape, act, weights, acc_rows(x_data, c_in, first, count, x_block),
                            acc_rows(g_data, c_out, first, count, g_block), hidden_rows, count,
                            activated, grad_h, sums, base_is_x, grad_x_rows);
              if (compute_grad_x) store_rows(grad_x_rows, c_in, first, count, grad_x_data);
            } else {
              gather(x_data, c_in, shape.spatial, first, count, width, x_block);
              gather(g_data, c_out, shape.spatial, first, count, width, g_block);
              backward_block(shape, act, weights, x_block, g_block, width, hidden_rows, count,
                             activated, grad_h, sums, base_is_x,
                             compute_grad_x ? grad_x_block : nullptr);
              if (compute_grad_x) {
                scatter(grad_x_block, width, static_cast<const scalar_t*>(nullptr), c_in,
                        shape.spatial, first, count, grad_x_data);
              }
            }
          }
        });

        // Chunk sums added in chunk order: deterministic.
        for (int64_t chunk = 1; chunk < chunks; ++chunk) {
          for (int64_t j = 0; j < partial_size; ++j) {
            partials[j] += partials[chunk * partial_size + j];
          }
        }
        const Partials<acc_t> total(partials.data(), shape);
        scalar_t* grad_up_data = grad_up.data_ptr<scalar_t>();
        for (int64_t o = 0; o < c_out; ++o) {
          const acc_t factor = scale.has_value() ? scale_values[o] : acc_t(1);
          for (int64_t k = 0; k < rank; ++k) {
            grad_up_data[o * rank + k] = static_cast<scalar_t>(total.g_t[k * c_out + o] * factor);
          }
        }
        if (scale.has_value()) {
          scalar_t* grad_scale_data = grad_scale.data_ptr<scalar_t>();
          for (int64_t o = 0; o < c_out; ++o) {
            acc_t value = 0;
            for (int64_t k = 0; k < rank; ++k) value += total.g_t[k * c_out + o] * up[o * rank + k];
            grad_scale_data[o] = static_cast<scalar_t>(value);
          }
        }
        std::copy(total.shift, total.shift + c_out, grad_shift.data_ptr<scalar_t>());
        std::copy(total.down, total.down + rank * c_in, grad_down.data_ptr<scalar_t>());
        std::copy(total.bias, total.bias + rank, grad_bias.data_ptr<scalar_t>());
      });
  return {grad_x, grad_down, grad_bias, grad_up, grad_scale, grad_shift};
}

}  // namespace selfheal
