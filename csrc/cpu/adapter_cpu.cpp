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
// chunk partials added in chunk order, so results do not depend on scheduling:
// a rerun at the same thread count is bit-identical. (The BLAS under each
// chunk's products may block its sums by its own thread setting, so across
// thread counts they agree to rounding only.)
//
// Small problems, and larger ones of low rank, never reach the tiles: their
// time would be the per-call and per-tile costs of the ATen calls, so they
// take the direct loops of adapter_direct_cpu.cpp (adapter_direct_fits says
// where, by measurement).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

#include "adapter_direct_cpu.h"
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
  return t.has_value() ? as_compute(*t, dtype).contiguous() : at::Tensor();
}

// One tile. Channels-last: rows [first, first + count) of the flattened
// [M, C] view (samples == 1). Channels-first: positions [first, first + count)
// of samples [n, n + samples); a tile either splits one large map (samples ==
// 1) or groups whole small maps (first == 0, count == spatial), so its
// positions are always consecutive rows of hidden.
struct Tile {
  int64_t n;
  int64_t first;
  int64_t count;
  int64_t samples;
  int64_t positions() const { return samples * count; }
  int64_t first_position(int64_t spatial) const { return n * spatial + first; }
};

std::vector<Tile> make_tiles(const AdapterShape& shape) {
  const int64_t per_tile = positions_per_tile(shape);
  std::vector<Tile> tiles;
  if (shape.spatial == 1) {
    for (int64_t m = 0; m < shape.n_outer; m += per_tile) {
      tiles.push_back({0, m, std::min(per_tile, shape.n_outer - m), 1});
    }
  } else if (shape.spatial > 0 && shape.spatial < per_tile) {
    const int64_t samples = per_tile / shape.spatial;
    for (int64_t n = 0; n < shape.n_outer; n += samples) {
      tiles.push_back({n, 0, shape.spatial, std::min(samples, shape.n_outer - n)});
    }
  } else {
    for (int64_t n = 0; n < shape.n_outer; ++n) {
      for (int64_t s = 0; s < shape.spatial; s += per_tile) {
        tiles.push_back({n, s, std::min(per_tile, shape.spatial - s), 1});
      }
    }
  }
  return tiles;
}

// Channels-last: the tile's rows of a [n_outer, C, 1] tensor, [count, C].
at::Tensor rows_of(const at::Tensor& t3, const Tile& tile) {
  return t3.select(2, 0).narrow(0, tile.first, tile.count);
}

// Channels-first: the tile's block of a [n_outer, C, spatial] tensor,
// [samples, C, count].
at::Tensor block_of(const at::Tensor& t3, const Tile& tile) {
  return t3.narrow(0, tile.n, tile.samples).narrow(2, tile.first, tile.count);
}

// A channels-first block [samples, C, count] as rows [samples * count, C]
// (a copy of the cache-resident block unless it holds a single sample).
at::Tensor block_as_rows(const at::Tensor& block) {
  return block.transpose(1, 2).reshape({-1, block.size(1)});
}

// Rows [samples * count, k] as a block [samples, k, count] (a view).
at::Tensor rows_as_block(const at::Tensor& rows, const Tile& tile) {
  return rows.view({tile.samples, tile.count, rows.size(1)}).transpose(1, 2);
}

// out = base + branch for a channels-last tile with a half-precision output
// whose branch [count, C] is computed in float32 first.
template <typename scalar_t, typename acc_t>
void write_output_rows(const at::Tensor& out3, const at::Tensor& base3,
                       const at::Tensor& branch, const Tile& tile, int64_t channels) {
  const acc_t* v = branch.data_ptr<acc_t>();
  scalar_t* out = out3.data_ptr<scalar_t>() + tile.first * channels;
  const scalar_t* base = base3.data_ptr<scalar_t>() + tile.first * channels;
  for (int64_t i = 0; i < tile.count * channels; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(base[i]) + v[i]);
  }
}

// The activation of a [rows, rank] tile, copied into out (a [rows, rank]
// view), with ATen's vectorised kernels (the scalar loop was the largest cost
// of small adapters: erf per element). (The out= variants are not used: into
// a strided view, gelu.out left the view unwritten with torch 2.14.1.)
void activate_into(at::Tensor out, const at::Tensor& hidden, Activation act) {
  switch (act) {
    case Activation::kRelu:
      out.copy_(at::relu(hidden));
      return;
    case Activation::kGelu:
      out.copy_(at::gelu(hidden));
      return;
    case Activation::kSilu:
      out.copy_(at::silu(hidden));
      return;
    case Activation::kIdentity:
    default:
      out.copy_(hidden);
  }
}

// grad * act'(hidden), vectorised (the same derivatives as activation.h).
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& hidden, Activation act) {
  switch (act) {
    case Activation::kRelu:
      return at::threshold_backward(grad, hidden, 0);
    case Activation::kGelu:
      return at::gelu_backward(grad, hidden);
    case Activation::kSilu:
      return at::silu_backward(grad, hidden);
    case Activation::kIdentity:
    default:
      return grad;
  }
}

// [rows, rank + 1]: activate(hidden) and a last column of ones (the shift's
// "activation").
at::Tensor activated_with_ones(const at::Tensor& hidden_tile, Activation act) {
  const int64_t rows = hidden_tile.size(0);
  const int64_t rank = hidden_tile.size(1);
  at::Tensor out = at::empty({rows, rank + 1}, hidden_tile.options());
  activate_into(out.narrow(1, 0, rank), hidden_tile, act);
  out.select(1, rank).fill_(1);
  return out;
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
  // One contiguous copy of a strided x serves as both input and base.
  const at::Tensor x_c = x.contiguous();
  if (adapter_direct_fits(shape, /*backward=*/false)) {
    return adapter_forward_direct(x_c, base.has_value() ? base->contiguous() : x_c,
                                  down_weight, down_bias, up_weight, scale, shift, act,
                                  channels_first, shape);
  }
  const bool channels_last = shape.spatial == 1;
  const at::ScalarType acc_dtype = compute_dtype(x);
  const auto acc_options = x.options().dtype(acc_dtype);
  const int64_t rank = shape.rank;

  const at::Tensor x3 = x_c.view({shape.n_outer, shape.channels_in, shape.spatial});
  const at::Tensor base3 = (base.has_value() ? base->contiguous() : x_c)
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
        // at::parallel_for does not carry thread-local state to its workers:
        // without this the ATen calls below would see the autograd and
        // autocast keys this kernel runs beneath.
        const at::ThreadLocalState caller_state;
        at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1,
                         [&](int64_t begin, int64_t end) {
          const at::ThreadLocalStateGuard state_guard(caller_state);
          for (int64_t t = begin; t < end; ++t) {
            const Tile& tile = tiles[t];
            at::Tensor hidden_tile = hidden.narrow(
                0, tile.first_position(shape.spatial), tile.positions());
            if (channels_last) {
              at::mm_out(hidden_tile, as_compute(rows_of(x3, tile), acc_dtype), down.t());
            } else {
              const at::Tensor x_block = as_compute(block_of(x3, tile), acc_dtype);
              rows_as_block(hidden_tile, tile).copy_(at::matmul(down, x_block));
            }
            if (bias.defined()) hidden_tile.add_(bias);
            const at::Tensor activated = activated_with_ones(hidden_tile, act);
            if (channels_last) {
              if (direct) {
                at::Tensor y_rows = rows_of(y3, tile);
                y_rows.copy_(rows_of(base3, tile));
                y_rows.addmm_(activated, up_folded.t());
              } else {
                write_output_rows<scalar_t, acc_t>(y3, base3, at::mm(activated, up_folded.t()),
                                                   tile, shape.channels_out);
              }
              continue;
            }
            // [samples, C_out, count] = base + up_folded @ [act | 1]^T per sample
            const at::Tensor up_batched =
                up_folded.expand({tile.samples, up_folded.size(0), up_folded.size(1)});
            at::Tensor y_block = block_of(y3, tile);
            if (direct) {
              y_block.copy_(block_of(base3, tile));
              y_block.baddbmm_(up_batched, rows_as_block(activated, tile));
            } else {
              y_block.copy_(at::baddbmm(block_of(base3, tile).to(acc_dtype), up_batched,
                                        rows_as_block(activated, tile)));
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
  if (adapter_direct_fits(shape, /*backward=*/true)) {
    return adapter_backward_direct(grad_y.contiguous(), x.contiguous(), hidden.contiguous(),
                                   down_weight, up_weight, scale, act, base_is_x,
                                   compute_grad_x, shape);
  }
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
        const at::ThreadLocalState caller_state;  // see adapter_forward_cpu
        at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          const at::ThreadLocalStateGuard state_guard(caller_state);
          for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            at::Tensor chunk_g = part_g[chunk];
            at::Tensor chunk_down = part_down[chunk];
            at::Tensor chunk_bias = part_bias[chunk];
            const int64_t first_tile = chunk * num_tiles / num_chunks;
            const int64_t last_tile = (chunk + 1) * num_tiles / num_chunks;
            for (int64_t t = first_tile; t < last_tile; ++t) {
              const Tile& tile = tiles[t];
              // the tile's x and grad_y with positions as rows: [positions, C]
              const at::Tensor x_rows = as_compute(
                  channels_last ? rows_of(x3, tile) : block_as_rows(block_of(x3, tile)),
                  acc_dtype);
              const at::Tensor g_rows = as_compute(
                  channels_last ? rows_of(g3, tile) : block_as_rows(block_of(g3, tile)),
                  acc_dtype);
              const int64_t positions = tile.positions();
              const at::Tensor h_tile =
                  hidden_c.narrow(0, tile.first_position(shape.spatial), positions);
              // grad of the pre-activation, [positions, rank], and [act(h) | 1]
              const at::Tensor grad_h =
                  activation_backward(at::mm(g_rows, scaled_up), h_tile, act);
              const at::Tensor activated = activated_with_ones(h_tile, act);
              chunk_g.addmm_(g_rows.t(), activated);
              chunk_down.addmm_(grad_h.t(), x_rows);
              chunk_bias.add_(grad_h.sum(0));
              if (!compute_grad_x) continue;
              // grad_x = grad_h @ down (+ grad_y when base is x)
              if (channels_last) {
                at::Tensor gx_rows = rows_of(grad_x3, tile);
                if (direct && base_is_x) {
                  gx_rows.copy_(g_rows);
                  gx_rows.addmm_(grad_h, down);
                } else if (direct) {
                  at::mm_out(gx_rows, grad_h, down);
                } else {
                  at::Tensor gx = at::mm(grad_h, down);
                  if (base_is_x) gx.add_(g_rows);
                  gx_rows.copy_(gx);
                }
                continue;
              }
              const at::Tensor down_t_batched =
                  down.t().expand({tile.samples, c_in, rank});
              const at::Tensor grad_h_block = rows_as_block(grad_h, tile);
              at::Tensor gx_block = block_of(grad_x3, tile);
              if (direct) {
                if (base_is_x) {
                  gx_block.copy_(block_of(g3, tile));
                } else {
                  gx_block.zero_();
                }
                gx_block.baddbmm_(down_t_batched, grad_h_block);
              } else {
                at::Tensor gx = at::bmm(down_t_batched, grad_h_block);
                if (base_is_x) gx.add_(block_of(g3, tile));
                gx_block.copy_(gx);
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
