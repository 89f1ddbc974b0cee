#pragma once
// The C++ tests' checks: count them, print each failure, and report at the end.
#include <ATen/ATen.h>

#include <iostream>
#include <sstream>
#include <string>

namespace expect_detail {
inline int checks = 0;
inline int failures = 0;
}  // namespace expect_detail

inline void expect(bool ok, const std::string& what) {
  ++expect_detail::checks;
  if (!ok) {
    ++expect_detail::failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

// actual == expected within tol (absolute and relative), compared in double.
inline void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what) {
  const at::Tensor a = actual.to(at::kDouble);
  const at::Tensor e = expected.to(at::kDouble);
  const bool same_shape = a.sizes() == e.sizes();
  const bool ok = same_shape && at::allclose(a, e, tol, tol);
  std::ostringstream msg;
  msg << what;
  if (!same_shape)
    msg << ": shape " << a.sizes() << " vs " << e.sizes();
  else if (!ok)
    msg << ": max |diff| = " << (a - e).abs().max().item<double>();
  expect(ok, msg.str());
}

// Prints the tally; the exit status of main.
inline int report() {
  std::cout << expect_detail::checks - expect_detail::failures << "/" << expect_detail::checks << " checks passed"
            << std::endl;
  return expect_detail::failures == 0 ? 0 : 1;
}
