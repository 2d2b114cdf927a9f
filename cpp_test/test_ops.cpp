// Calls the selfheal ops the way a C++ (libtorch) user does: through the
// dispatcher, with libselfheal_ext.so linked but never called by name, so the
// ops exist only if its static registration ran.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what, const at::Tensor& got) {
  if (ok) {
    std::cout << "ok      " << what << "\n";
    return;
  }
  std::cout << "FAILED  " << what << ", got\n" << got << "\n";
  ++failures;
}

c10::OperatorHandle find_op(const char* name) {
  try {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  } catch (const c10::Error&) {
    std::cerr << name << " is not registered with the dispatcher: was "
              << "libselfheal_ext.so dropped from the link (it needs "
              << "-Wl,--no-as-needed)?\n";
    throw;
  }
}

// F = 2 features, 4 bins on [0, 1): column 0 counts x < lo, column 5 x >= hi.
// By the rule of histogram_bin.h, feature 0 puts -1 in column 0, 0.25 in 2,
// 0.5 in 3, 1 in 5 and 0.75 in 4; feature 1 puts 0 in 1, 0.5 in 3, 0.99 in 4,
// and counts NaN and inf as nonfinite.
void check_histogram_update() {
  const auto histogram_update = find_op("selfheal::histogram_update_")
      .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&)>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const at::Tensor x = at::tensor(std::vector<float>{-1.0f, 0.0f,
                                                     0.25f, 0.5f,
                                                     0.5f, 0.99f,
                                                     1.0f, nan,
                                                     0.75f, inf})
                           .reshape({5, 2});
  const at::Tensor lo = at::zeros({2}, at::kFloat);
  const at::Tensor hi = at::ones({2}, at::kFloat);
  at::Tensor counts = at::zeros({2, 6}, at::kLong);
  at::Tensor nonfinite = at::zeros({2}, at::kLong);

  // Twice, to check that counts accumulate rather than being overwritten.
  histogram_update.call(counts, nonfinite, x, lo, hi);
  histogram_update.call(counts, nonfinite, x, lo, hi);

  const at::Tensor expected_counts =
      at::tensor(std::vector<int64_t>{2, 0, 2, 2, 2, 2,
                                      0, 2, 0, 2, 2, 0})
          .reshape({2, 6});
  const at::Tensor expected_nonfinite = at::tensor(std::vector<int64_t>{0, 4});
  expect(at::equal(counts, expected_counts),
         "histogram_update_ counts == [[2, 0, 2, 2, 2, 2], [0, 2, 0, 2, 2, 0]]",
         counts);
  expect(at::equal(nonfinite, expected_nonfinite),
         "histogram_update_ nonfinite == [0, 4]", nonfinite);
}

void check_kl_divergence() {
  const auto kl_divergence = find_op("selfheal::kl_divergence")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  const at::Tensor p =
      at::tensor(std::vector<int64_t>{1, 3, 2, 2}).reshape({2, 2});
  const at::Tensor q =
      at::tensor(std::vector<int64_t>{3, 1, 2, 2}).reshape({2, 2});

  const at::Tensor self_divergence = kl_divergence.call(p, p, 1.0);
  expect(at::equal(self_divergence, at::zeros({2}, at::kFloat)),
         "kl_divergence(p, p) == [0, 0]", self_divergence);

  // With pseudo-count 1, row 0 compares (1/3, 2/3) with (2/3, 1/3):
  // 1/3 ln(1/2) + 2/3 ln 2 = ln(2) / 3. Row 1 is the same table on both sides.
  const at::Tensor divergence = kl_divergence.call(p, q, 1.0);
  const float expected_row0 = static_cast<float>(std::log(2.0) / 3.0);
  const bool close =
      divergence.dim() == 1 && divergence.size(0) == 2 &&
      divergence.scalar_type() == at::kFloat &&
      std::abs(divergence[0].item<float>() - expected_row0) <= 1e-6f &&
      divergence[1].item<float>() == 0.0f;
  expect(close,
         "kl_divergence(p, q) == [ln(2) / 3, 0] = [" +
             std::to_string(expected_row0) + ", 0]",
         divergence);
}

}  // namespace

int main() {
  try {
    check_histogram_update();
    check_kl_divergence();
  } catch (const c10::Error& error) {
    std::cerr << "FAILED  with an exception: " << error.what_without_backtrace()
              << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "FAILED  with an exception: " << error.what() << "\n";
    return 1;
  }
  if (failures > 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "all selfheal dispatcher checks passed\n";
  return 0;
}
