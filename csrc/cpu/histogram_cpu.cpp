// CPU histogram updates: each task counts its rows into a private table, and
// the private tables are added into counts at the end. Integer counts make the
// result exact and independent of how rows were split.
//
// histogram_update_ bins the columns of x; sketch_histogram_update_ first
// reduces each row of x to F values (a count sketch: value j is the weighted
// sum of the inputs whose bucket is j, accumulated in float64 in input order
// and rounded to float32) and bins those, with no [N, F] tensor in between.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "selfheal/checks.h"
#include "selfheal/dispatch.h"
#include "selfheal/histogram_bin.h"
#include "selfheal/ops.h"

namespace selfheal {
namespace {

constexpr int64_t kBlockRows = 8;

// The table cell of each value of one row, as selects on doubles with every
// load made unconditionally first, in a function of its own with restrict
// pointers: with -fno-trapping-math (setup.py) GCC then vectorises the loop
// (SSE2 divpd and masks). It is histogram_column with the same float64
// arithmetic, so the same column for every value. Selects between integers,
// or loads inside a select, kept it scalar with branches: about 10 ns a value.
void row_cells(const double* __restrict row_values, const double* __restrict lo_p,
               const double* __restrict hi_p, const double* __restrict span_p,
               const double* __restrict base_p, const double* __restrict nonfinite_p,
               int32_t* __restrict cell_data, int64_t features, double bins_d, double top,
               double overflow_d) {
  for (int64_t f = 0; f < features; ++f) {
    const double v = row_values[f];
    const double lo_v = lo_p[f];
    const double hi_v = hi_p[f];
    const double span_v = span_p[f];
    const double base_v = base_p[f];
    const double bad_v = nonfinite_p[f];
    const double position = (v - lo_v) * bins_d / span_v;
    const double positive = position >= 0.0 ? position : 0.0;  // NaN edges -> bin 1
    const double clamped = positive < top ? positive : top;
    // floor as a round trip through int32 (exact here); adding 1 first could
    // round a position just below 1 up to bin 2
    const double inside = 1.0 + static_cast<double>(static_cast<int32_t>(clamped));
    const double above = v >= hi_v ? overflow_d : inside;
    const double column = v < lo_v ? 0.0 : above;
    const double good = base_v + column;
    const double cell = (v - v) == 0.0 ? good : bad_v;  // false for NaN and +-Inf
    cell_data[f] = static_cast<int32_t>(cell);
  }
}

// Counts rows [0, rows) into counts/nonfinite. fill_rows(n, count, values)
// writes the values of rows n .. n + count - 1 (count <= kBlockRows) as
// [count, features] doubles, each already a float32 value.
// `values_per_row` is how many input values a row costs, for the split.
template <typename FillRows>
void count_rows(at::Tensor& counts, at::Tensor& nonfinite, const at::Tensor& lo,
                const at::Tensor& hi, int64_t rows, int64_t values_per_row,
                const FillRows& fill_rows) {
  const int64_t features = counts.size(0);
  const int64_t width = counts.size(1);
  const int64_t bins = width - 2;
  if (rows == 0 || features == 0) return;
  const at::Tensor lo_c = lo.contiguous();
  const at::Tensor hi_c = hi.contiguous();
  const float* lo_data = lo_c.data_ptr<float>();
  const float* hi_data = hi_c.data_ptr<float>();

  // One private table per task; tasks are fixed row ranges. Each task counts
  // at least as many values as its table holds, so the tables never outgrow
  // the input (many features, many bins, few rows: one task).
  const int64_t per_row = std::max<int64_t>(1, values_per_row);
  const int64_t grain =
      std::max<int64_t>(std::max<int64_t>(1, 65536 / per_row), width);
  const int64_t tasks = std::min<int64_t>(
      (rows + grain - 1) / grain, std::max<int64_t>(1, at::get_num_threads()));
  std::vector<std::vector<int64_t>> private_counts(tasks);

  // Per-feature edges in float64, as histogram_column reads them.
  std::vector<double> lo_d(features), hi_d(features), span_d(features);
  for (int64_t f = 0; f < features; ++f) {
    lo_d[f] = static_cast<double>(lo_data[f]);
    hi_d[f] = static_cast<double>(hi_data[f]);
    span_d[f] = hi_d[f] - lo_d[f];
  }
  const double bins_d = static_cast<double>(bins);
  const double top = static_cast<double>(bins - 1);
  const double overflow_d = static_cast<double>(bins + 1);
  // First cell of each feature's row, and its non-finite cell, as doubles
  // (exact: the table has fewer than 2^31 cells).
  std::vector<double> base_d(features), nonfinite_d(features);
  for (int64_t f = 0; f < features; ++f) {
    base_d[f] = static_cast<double>(f * width);
    nonfinite_d[f] = static_cast<double>(features * width + f);
  }
  const double* __restrict lo_p = lo_d.data();
  const double* __restrict hi_p = hi_d.data();
  const double* __restrict span_p = span_d.data();
  const double* __restrict base_p = base_d.data();
  const double* __restrict nonfinite_p = nonfinite_d.data();
  // One table per task: features * width bin cells, then one non-finite cell
  // per feature, so every value is a single increment.
  const int64_t cells_per_table = features * width + features;
  TORCH_CHECK(cells_per_table < (int64_t{1} << 31),
              "selfheal: histogram updates on the CPU support at most 2^31 - 1 table cells "
              "(features * (bins + 3)); got ", cells_per_table);

  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<int32_t> cell(features);
    std::vector<double> values(kBlockRows * features);
    for (int64_t task = task_begin; task < task_end; ++task) {
      std::vector<int64_t>& table = private_counts[task];
      table.assign(cells_per_table, 0);
      const int64_t row_begin = task * rows / tasks;
      const int64_t row_end = (task + 1) * rows / tasks;
      int32_t* __restrict cell_data = cell.data();
      double* value_data = values.data();
      for (int64_t block = row_begin; block < row_end; block += kBlockRows) {
       const int64_t block_rows = std::min(kBlockRows, row_end - block);
       fill_rows(block, block_rows, value_data);
       for (int64_t r = 0; r < block_rows; ++r) {
        const double* row_values = value_data + r * features;
        row_cells(row_values, lo_p, hi_p, span_p, base_p, nonfinite_p, cell_data, features, bins_d,
                  top, overflow_d);
        int64_t* table_data = table.data();
        for (int64_t f = 0; f < features; ++f) {
          ++table_data[cell_data[f]];
        }
       }
      }
    }
  });

  int64_t* counts_data = counts.data_ptr<int64_t>();
  int64_t* nonfinite_data = nonfinite.data_ptr<int64_t>();
  at::parallel_for(0, features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t* table = private_counts[task].data();
      for (int64_t f = begin; f < end; ++f) {
        nonfinite_data[f] += table[features * width + f];
        for (int64_t b = 0; b < width; ++b) {
          counts_data[f * width + b] += table[f * width + b];
        }
      }
    }
  });
}

}  // namespace

void histogram_update_cpu(at::Tensor& counts, at::Tensor& nonfinite,
                          const at::Tensor& x, const at::Tensor& lo,
                          const at::Tensor& hi) {
  check_histogram_update(counts, nonfinite, x, lo, hi);
  const int64_t features = x.size(1);
  const int64_t row_stride = x.stride(0);
  const int64_t feature_stride = x.stride(1);
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "histogram_update_cpu", [&] {
        const scalar_t* data = x.data_ptr<scalar_t>();
        count_rows(counts, nonfinite, lo, hi, x.size(0), features,
                   [&](int64_t first, int64_t count, double* values) {
                     for (int64_t r = 0; r < count; ++r) {
                       const scalar_t* row = data + (first + r) * row_stride;
                       double* out = values + r * features;
                       for (int64_t f = 0; f < features; ++f) {
                         out[f] = static_cast<double>(
                             static_cast<float>(row[f * feature_stride]));
                       }
                     }
                   });
      });
}

void sketch_histogram_update_cpu(at::Tensor& counts, at::Tensor& nonfinite,
                                 const at::Tensor& x, const at::Tensor& bucket,
                                 const at::Tensor& weight, const at::Tensor& lo,
                                 const at::Tensor& hi) {
  check_sketch_histogram_update(counts, nonfinite, x, bucket, weight, lo, hi);
  const int64_t features = counts.size(0);
  const int64_t width = x.size(1);
  // Inputs grouped by bucket (a stable counting sort, so each sum runs in
  // input order): a row's sketch is then one gather-and-add per bucket into a
  // register, with no read-modify-write of a shared accumulator.
  const at::Tensor bucket_c = bucket.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const int64_t* bucket_data = bucket_c.data_ptr<int64_t>();
  const float* weight_data = weight_c.data_ptr<float>();
  std::vector<int64_t> start(features + 1, 0);
  for (int64_t d = 0; d < width; ++d) {
    const int64_t b = bucket_data[d];
    TORCH_CHECK(b >= 0 && b < features, "selfheal: argument 'bucket' must hold values in [0, ",
                features, "), got ", b, " at index ", d);
    ++start[b + 1];
  }
  for (int64_t f = 0; f < features; ++f) start[f + 1] += start[f];
  std::vector<int64_t> order(width);
  std::vector<double> order_weight(width);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t d = 0; d < width; ++d) {
      const int64_t slot = next[bucket_data[d]]++;
      order[slot] = d * kBlockRows;
      order_weight[slot] = static_cast<double>(weight_data[d]);
    }
  }
  const int64_t row_stride = x.stride(0);
  const int64_t column_stride = x.stride(1);
  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "sketch_histogram_update_cpu", [&] {
        const scalar_t* data = x.data_ptr<scalar_t>();
        // kBlockRows rows at a time, transposed to [width, kBlockRows] floats
        // (a row block of a 1024-wide tap is 32 KB, L1-sized): each input of
        // a bucket then advances one float64 accumulator per row in a loop of
        // fixed length that vectorises, and the adds form independent chains.
        count_rows(counts, nonfinite, lo, hi, x.size(0), width,
                   [&](int64_t first, int64_t count, double* values) {
                     thread_local std::vector<float> block;
                     block.resize(width * kBlockRows);
                     float* block_data = block.data();
                     const scalar_t* rows_data[kBlockRows];
                     for (int64_t r = 0; r < kBlockRows; ++r) {
                       // Short blocks repeat their last row; its sums are not kept.
                       rows_data[r] = data + (first + std::min(r, count - 1)) * row_stride;
                     }
                     for (int64_t d = 0; d < width; ++d) {
                       const int64_t offset = d * column_stride;
                       for (int64_t r = 0; r < kBlockRows; ++r) {
                         block_data[d * kBlockRows + r] = static_cast<float>(rows_data[r][offset]);
                       }
                     }
                     for (int64_t f = 0; f < features; ++f) {
                       double sum[kBlockRows] = {0.0};
                       for (int64_t k = start[f]; k < start[f + 1]; ++k) {
                         const float* source = block_data + order[k];
                         const double w = order_weight[k];
                         for (int64_t r = 0; r < kBlockRows; ++r) {
                           sum[r] += w * static_cast<double>(source[r]);
                         }
                       }
                       for (int64_t r = 0; r < count; ++r) {
                         values[r * features + f] = static_cast<double>(static_cast<float>(sum[r]));
                       }
                     }
                   });
      });
}

}  // namespace selfheal
