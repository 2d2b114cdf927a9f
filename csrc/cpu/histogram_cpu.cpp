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
  std::vector<std::vector<int64_t>> private_nonfinite(tasks);

  SELFHEAL_DISPATCH_FLOAT_HALF_BF16(
      x.scalar_type(), "histogram_update_cpu", [&] {
        const scalar_t* data = x.data_ptr<scalar_t>();
        at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
          for (int64_t task = task_begin; task < task_end; ++task) {
            std::vector<int64_t>& table = private_counts[task];
            std::vector<int64_t>& bad = private_nonfinite[task];
            table.assign(features * width, 0);
            bad.assign(features, 0);
            const int64_t row_begin = task * rows / tasks;
            const int64_t row_end = (task + 1) * rows / tasks;
            for (int64_t n = row_begin; n < row_end; ++n) {
              const scalar_t* row = data + n * row_stride;
              for (int64_t f = 0; f < features; ++f) {
                const float v = static_cast<float>(row[f * feature_stride]);
                if (!std::isfinite(v)) {
                  ++bad[f];
                  continue;
                }
                ++table[f * width + histogram_column(v, lo_data[f], hi_data[f], bins)];
              }
            }
          }
        });
      });

  int64_t* counts_data = counts.data_ptr<int64_t>();
  int64_t* nonfinite_data = nonfinite.data_ptr<int64_t>();
  at::parallel_for(0, features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = 0; task < tasks; ++task) {
      for (int64_t f = begin; f < end; ++f) {
        nonfinite_data[f] += private_nonfinite[task][f];
        for (int64_t b = 0; b < width; ++b) {
          counts_data[f * width + b] += private_counts[task][f * width + b];
        }
      }
    }
  });
}

}  // namespace selfheal
