// CPU histogram update: each task counts its rows into a private table, and
// the private tables are added into counts at the end. Integer counts make the
// result exact and independent of how rows were split.
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

void histogram_update_cpu(at::Tensor& counts, at::Tensor& nonfinite,
                          const at::Tensor& x, const at::Tensor& lo,
                          const at::Tensor& hi) {
  check_histogram_update(counts, nonfinite, x, lo, hi);
  const int64_t rows = x.size(0);
  const int64_t features = x.size(1);
  const int64_t width = counts.size(1);
  const int64_t bins = width - 2;
  if (rows == 0 || features == 0) return;
  const at::Tensor lo_c = lo.contiguous();
  const at::Tensor hi_c = hi.contiguous();
  const float* lo_data = lo_c.data_ptr<float>();
  const float* hi_data = hi_c.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  const int64_t feature_stride = x.stride(1);

  // One private table per task; tasks are fixed row ranges. Each task counts
  // at least as many values as its table holds, so the tables never outgrow
  // the input (many features, many bins, few rows: one task).
  const int64_t grain = std::max<int64_t>(std::max<int64_t>(1, 65536 / features), width);
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
  const int32_t overflow = static_cast<int32_t>(bins + 1);
  // One table per task: features * width bin cells, then one non-finite cell
  // per feature, so every value is a single increment.
  const int64_t cells_per_table = features * width + features;
  TORCH_CHECK(cells_per_table < (int64_t{1} << 31),
              "selfheal: histogram_update_ on the CPU supports at most 2^31 - 1 table cells "
              "(features * (bins + 3)); got ", cells_per_table);

  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "histogram_update_cpu", [&] {
        const scalar_t* data = x.data_ptr<scalar_t>();
        at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
          std::vector<int32_t> cell(features);
          for (int64_t task = task_begin; task < task_end; ++task) {
            std::vector<int64_t>& table = private_counts[task];
            table.assign(cells_per_table, 0);
            const int64_t row_begin = task * rows / tasks;
            const int64_t row_end = (task + 1) * rows / tasks;
            int32_t* cell_data = cell.data();
            for (int64_t n = row_begin; n < row_end; ++n) {
              const scalar_t* row = data + n * row_stride;
              // Pass 1 computes every value's cell without branches, so it
              // vectorises; it is histogram_column written with selects (the
              // same float64 arithmetic, so the same column on every value).
              // Pass 2 increments. Mispredicted under/overflow branches and a
              // scalar float64 division per value made the one-pass loop
              // about 10 ns per value.
              for (int64_t f = 0; f < features; ++f) {
                const double v = static_cast<double>(static_cast<float>(row[f * feature_stride]));
                const bool finite = (v - v) == 0.0;  // false for NaN and +-Inf
                const double position = (v - lo_d[f]) * bins_d / span_d[f];
                const double clamped = position >= 0.0 ? position : 0.0;  // NaN edges -> bin 1
                const int32_t inside = 1 + static_cast<int32_t>(clamped < top ? clamped : top);
                const int32_t above = v >= hi_d[f] ? overflow : inside;
                const int32_t column = v < lo_d[f] ? 0 : above;
                cell_data[f] = finite ? static_cast<int32_t>(f * width) + column
                                      : static_cast<int32_t>(features * width + f);
              }
              int64_t* table_data = table.data();
              for (int64_t f = 0; f < features; ++f) {
                ++table_data[cell_data[f]];
              }
            }
          }
        });
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

}  // namespace selfheal
