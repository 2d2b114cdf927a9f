// CPU adapter forward and backward.
//
// The positions of x are processed in cache-sized tiles: for each tile the
// down projection, bias, activation, up projection, scale, shift and the add
// to base all run while the tile is in cache, so x and base are read from
// memory once and y is written once. The small matrix products of a tile go to
// the BLAS that ATen uses, with the scale folded into the up weight and the
// shift into an extra rank column whose activation is 1: for float32/float64
// the whole epilogue is then one accumulate-into-y product and no tile-sized
// temporary is made. The same ones column gives the shift gradient for free in
// the backward. Weight gradients are summed per fixed chunk of tiles and the
// chunk partials added in chunk order, so results do not depend on the thread
// count or on scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "selfheal/activation.h"
#include "selfheal/checks.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

constexpr int64_t kMaxChunks = 16;

// Positions per tile: about 256K channel values (1 MiB in fp32), so a tile of
// x and of the branch output stay in cache between the steps while each
// matrix product is large enough to amortise its call overhead (measured on
// a 2-core AVX2 machine: 64K-value tiles were 2x slower in the backward).
int64_t positions_per_tile(const AdapterShape& shape) {
  const int64_t widest = std::max(shape.channels_in, shape.channels_out);
  return std::clamp<int64_t>(262144 / widest, 8, 1024);
}

// Arithmetic runs in float32, or float64 for float64 inputs.
at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor compute_or_undefined(const std::optional<at::Tensor>& t,
                                at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : at::Tensor();
}

// One tile: positions [first, first + count) of sample n (channels-first), or
// rows [first, first + count) of the flattened [M, C] view (channels-last).
struct Tile {
  int64_t n;
  int64_t first;
  int64_t count;
};

std::vector<Tile> make_tiles(const AdapterShape& shape) {
  const int64_t per_tile = positions_per_tile(shape);
  std::vector<Tile> tiles;
  if (shape.spatial == 1) {
    for (int64_t m = 0; m < shape.n_outer; m += per_tile) {
      tiles.push_back({0, m, std::min(per_tile, shape.n_outer - m)});
    }
  } else {
    for (int64_t n = 0; n < shape.n_outer; ++n) {
      for (int64_t s = 0; s < shape.spatial; s += per_tile) {
        tiles.push_back({n, s, std::min(per_tile, shape.spatial - s)});
      }
    }
  }
  return tiles;
}

// The tile of a [n_outer, C, spatial] tensor as a matrix whose rows are
// positions: [count, C] for channels-last, [C, count] for channels-first.
at::Tensor tile_of(const at::Tensor& t3, const Tile& tile, bool channels_last) {
  if (channels_last) return t3.select(2, 0).narrow(0, tile.first, tile.count);
  return t3.select(0, tile.n).narrow(1, tile.first, tile.count);
}

// out = base + branch for one tile, for half-precision outputs whose branch is
// computed in float32 first; inner loops run along contiguous memory.
template <typename scalar_t, typename acc_t>
void write_output_tile(const at::Tensor& out3, const at::Tensor& base3,
                       const at::Tensor& branch, const Tile& tile,
                       bool channels_last, int64_t channels) {
  const acc_t* branch_data = branch.data_ptr<acc_t>();
  const int64_t spatial = out3.size(2);
  scalar_t* out = out3.data_ptr<scalar_t>();
  const scalar_t* base = base3.data_ptr<scalar_t>();
  const int64_t rows = channels_last ? tile.count : channels;
  const int64_t row_length = channels_last ? channels : tile.count;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t first = channels_last
                              ? (tile.first + row) * channels
                              : (tile.n * channels + row) * spatial + tile.first;
    const acc_t* v = branch_data + row * row_length;
    for (int64_t i = 0; i < row_length; ++i) {
      out[first + i] =
          static_cast<scalar_t>(static_cast<acc_t>(base[first + i]) + v[i]);
    }
  }
}

// [rows, rank + 1]: activate(hidden) and a last column of ones (the shift's
// "activation").
template <typename acc_t>
at::Tensor activated_with_ones(const at::Tensor& hidden_tile, Activation act) {
  const int64_t rows = hidden_tile.size(0);
  const int64_t rank = hidden_tile.size(1);
  at::Tensor out = at::empty({rows, rank + 1}, hidden_tile.options());
  const acc_t* h = hidden_tile.data_ptr<acc_t>();
  acc_t* a = out.data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < rank; ++k) a[i * (rank + 1) + k] = activate(act, h[i * rank + k]);
    a[i * (rank + 1) + rank] = acc_t(1);
  }
  return out;
}

// dst = a @ b (+ dst when accumulate), with dst possibly a strided tile view.
void product_into(at::Tensor dst, const at::Tensor& a, const at::Tensor& b,
                  bool accumulate) {
  if (accumulate) {
    dst.addmm_(a, b);
  } else {
    at::mm_out(dst, a, b);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& base,
    const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, c10::string_view activation,
    bool channels_first) {
  SELFHEAL_NO_AUTOCAST;
  const AdapterShape shape = check_adapter_forward(
      x, base, down_weight, down_bias, up_weight, scale, shift, channels_first,
      /*allow_float64=*/true);
  const Activation act = parse_activation(activation);
  const bool channels_last = shape.spatial == 1;
  const at::ScalarType acc_dtype = compute_dtype(x);
  const auto acc_options = x.options().dtype(acc_dtype);
  const int64_t rank = shape.rank;

  const at::Tensor x3 =
      x.contiguous().view({shape.n_outer, shape.channels_in, shape.spatial});
  const at::Tensor base3 =
      (base.has_value() ? base->contiguous() : x.contiguous())
          .view({shape.n_outer, shape.channels_out, shape.spatial});
  at::Tensor y = at::empty(
      adapter_output_sizes(x, shape.channels_out, channels_first), x.options());
  const at::Tensor y3 = y.view({shape.n_outer, shape.channels_out, shape.spatial});
  at::Tensor hidden = at::empty({shape.positions(), rank}, acc_options);

  const at::Tensor down = as_compute(down_weight, acc_dtype).contiguous();
  const at::Tensor bias = compute_or_undefined(down_bias, acc_dtype);
  // [C_out, rank + 1] = [scale * up | shift]
  at::Tensor up_folded = at::zeros({shape.channels_out, rank + 1}, acc_options);
  up_folded.narrow(1, 0, rank).copy_(as_compute(up_weight, acc_dtype));
  if (scale.has_value()) {
    up_folded.narrow(1, 0, rank).mul_(as_compute(*scale, acc_dtype).unsqueeze(1));
  }
  if (shift.has_value()) up_folded.select(1, rank).copy_(*shift);
  // float32/float64 outputs are accumulated into directly.
  const bool direct = x.scalar_type() == acc_dtype;

  const std::vector<Tile> tiles = make_tiles(shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1,
                         [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const Tile& tile = tiles[t];
            const at::Tensor x_tile =
                as_compute(tile_of(x3, tile, channels_last), acc_dtype);
            at::Tensor hidden_tile = hidden.narrow(
                0, tile.n * shape.spatial + tile.first, tile.count);
            if (channels_last) {
              at::mm_out(hidden_tile, x_tile, down.t());
            } else {
              hidden_tile.copy_(at::mm(down, x_tile).t());
            }
            if (bias.defined()) hidden_tile.add_(bias);
            const at::Tensor activated = activated_with_ones<acc_t>(hidden_tile, act);
            // channels-last tiles are [count, C], channels-first [C, count]
            const at::Tensor lhs = channels_last ? activated : up_folded;
            const at::Tensor rhs = channels_last ? up_folded.t() : activated.t();
            if (direct) {
              at::Tensor y_tile = tile_of(y3, tile, channels_last);
              y_tile.copy_(tile_of(base3, tile, channels_last));
              product_into(y_tile, lhs, rhs, /*accumulate=*/true);
            } else {
              write_output_tile<scalar_t, acc_t>(y3, base3, at::mm(lhs, rhs), tile,
                                                 channels_last, shape.channels_out);
            }
          }
        });
      });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                     const at::Tensor& hidden, const at::Tensor& down_weight,
                     const at::Tensor& up_weight,
                     const std::optional<at::Tensor>& scale,
                     c10::string_view activation, bool channels_first,
                     bool base_is_x, bool compute_grad_x) {
  SELFHEAL_NO_AUTOCAST;
  const AdapterShape shape =
      check_adapter_backward(grad_y, x, hidden, down_weight, up_weight, scale,
                             channels_first, base_is_x, /*allow_float64=*/true);
  const Activation act = parse_activation(activation);
  const at::ScalarType acc_dtype = compute_dtype(x);
  const auto acc_options = x.options().dtype(acc_dtype);
  const bool channels_last = shape.spatial == 1;
  const int64_t rank = shape.rank;
  const int64_t c_in = shape.channels_in;
  const int64_t c_out = shape.channels_out;

  const at::Tensor x3 = x.contiguous().view({shape.n_outer, c_in, shape.spatial});
  const at::Tensor g3 = grad_y.contiguous().view({shape.n_outer, c_out, shape.spatial});
  const at::Tensor hidden_c = hidden.contiguous();
  const at::Tensor down = as_compute(down_weight, acc_dtype).contiguous();
  const at::Tensor up = as_compute(up_weight, acc_dtype).contiguous();
  const at::Tensor scale_c = compute_or_undefined(scale, acc_dtype);
  // d(loss)/d(activated) = grad_y @ (scale * up): fold the scale in once.
  const at::Tensor scaled_up = scale_c.defined() ? up * scale_c.unsqueeze(1) : up;
  const bool direct = x.scalar_type() == acc_dtype;

  at::Tensor grad_x = compute_grad_x ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                     : at::empty({0}, x.options());
  const at::Tensor grad_x3 =
      compute_grad_x ? grad_x.view({shape.n_outer, c_in, shape.spatial}) : grad_x;

  const std::vector<Tile> tiles = make_tiles(shape);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  const int64_t num_chunks = std::max<int64_t>(1, std::min(kMaxChunks, num_tiles));
  // Per-chunk partial sums: G = grad_y^T [act(hidden) | 1] (its last column is
  // the shift gradient), the grad of down and of the down bias.
  at::Tensor part_g = at::zeros({num_chunks, c_out, rank + 1}, acc_options);
  at::Tensor part_down = at::zeros({num_chunks, rank, c_in}, acc_options);
  at::Tensor part_bias = at::zeros({num_chunks, rank}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            at::Tensor chunk_g = part_g[chunk];
            at::Tensor chunk_down = part_down[chunk];
            at::Tensor chunk_bias = part_bias[chunk];
            const int64_t first_tile = chunk * num_tiles / num_chunks;
            const int64_t last_tile = (chunk + 1) * num_tiles / num_chunks;
            for (int64_t t = first_tile; t < last_tile; ++t) {
              const Tile& tile = tiles[t];
              const at::Tensor x_tile =
                  as_compute(tile_of(x3, tile, channels_last), acc_dtype);
              const at::Tensor g_tile =
                  as_compute(tile_of(g3, tile, channels_last), acc_dtype);
              // g_rows: the tile's grad_y with positions as rows, [count, C_out]
              const at::Tensor g_rows = channels_last ? g_tile : g_tile.t();
              const at::Tensor h_tile = hidden_c.narrow(
                  0, tile.n * shape.spatial + tile.first, tile.count);
              // grad of the pre-activation, [count, rank], and [act(h) | 1]
              at::Tensor grad_h = at::mm(g_rows, scaled_up);
              at::Tensor activated = at::empty({tile.count, rank + 1}, acc_options);
              acc_t* gh = grad_h.data_ptr<acc_t>();
              acc_t* a = activated.data_ptr<acc_t>();
              const acc_t* h = h_tile.data_ptr<acc_t>();
              for (int64_t i = 0; i < tile.count; ++i) {
                for (int64_t k = 0; k < rank; ++k) {
                  acc_t slope;
                  activate_with_grad(act, h[i * rank + k], &a[i * (rank + 1) + k], &slope);
                  gh[i * rank + k] *= slope;
                }
                a[i * (rank + 1) + rank] = acc_t(1);
              }
              chunk_g.addmm_(g_rows.t(), activated);
              chunk_down.addmm_(grad_h.t(), channels_last ? x_tile : x_tile.t());
              chunk_bias.add_(grad_h.sum(0));
              if (!compute_grad_x) continue;
              // grad_x tile = grad_h @ down (+ grad_y when base is x)
              const at::Tensor lhs = channels_last ? grad_h : down.t();
              const at::Tensor rhs = channels_last ? down : grad_h.t();
              at::Tensor gx_tile = tile_of(grad_x3, tile, channels_last);
              if (direct) {
                if (base_is_x) gx_tile.copy_(g_tile);
                product_into(gx_tile, lhs, rhs, /*accumulate=*/base_is_x);
              } else {
                at::Tensor gx = at::mm(lhs, rhs);
                if (base_is_x) gx.add_(g_tile);
                gx_tile.copy_(gx);
              }
            }
          }
        });
      });

  // Chunk partials summed in chunk order: deterministic.
  at::Tensor g_total = part_g[0].clone();
  at::Tensor down_total = part_down[0].clone();
  at::Tensor bias_total = part_bias[0].clone();
  for (int64_t chunk = 1; chunk < num_chunks; ++chunk) {
    g_total.add_(part_g[chunk]);
    down_total.add_(part_down[chunk]);
    bias_total.add_(part_bias[chunk]);
  }
  // Fresh contiguous results in the weights' dtype (never views of g_total).
  const auto as_result = [&](const at::Tensor& t) {
    return t.to(down_weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true,
                at::MemoryFormat::Contiguous);
  };
  const at::Tensor g_up = g_total.narrow(1, 0, rank);
  const at::Tensor grad_up = scale_c.defined() ? g_up * scale_c.unsqueeze(1) : g_up;
  const at::Tensor grad_scale = scale_c.defined() ? as_result((g_up * up).sum(1))
                                                  : at::empty({0}, x.options());
  return {grad_x,
          as_result(down_total),
          as_result(bias_total),
          as_result(grad_up),
          grad_scale,
          as_result(g_total.select(1, rank))};
}

}  // namespace selfheal
