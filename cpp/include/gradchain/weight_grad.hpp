// Weight gradients dW = sum_r D_r^T M_r formed again at each row's own scale, where the
// product formed at the factors' shared scales came out far below them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "gradchain/scaled.hpp"

namespace gradchain {

// Columns [col, col + width) of D that multiply into rows [row, row + width) of dW.
struct ColumnRun {
  std::size_t row, col, width;
};

// Marks a group of rows that is zero (its contents undefined).
inline constexpr std::int64_t kZeroRows = std::numeric_limits<std::int64_t>::min();

// The rows of sum_r D_r^T M_r: D_r is read in `runs` of the row at d + r * ldd, times
// 2^exp[r / group] (exp null: 2^0); M_r is the `width` entries at m + r * width.
template <class T>
struct ProductRows {
  std::size_t rows = 0;
  const T* d = nullptr;
  std::size_t ldd = 0;
  const std::vector<ColumnRun>* runs = nullptr;
  const std::int64_t* exp = nullptr;
  std::size_t group = 1;
  const T* m = nullptr;
  std::size_t width = 0;
};

// dW again, each row's D_r and M_r scaled by powers of two so that its products lie as far
// below the largest row's as they truly do, and those near 1. Factors brought into the band
// by their own largest entries keep the product of those two in range, but the two may lie
// in different rows (M largest where D is 0, D largest where M is 0), and the products that
// remain may be those of a row small in both, below the subnormals.
//
// `product(ds, ms, n, first)` forms dW from n scaled rows (first), or adds them to it; ds
// holds D's runs at ldd apart (nothing else of it is read), ms M's rows; the rows come in
// pieces of at most `chunk`. Returns dW's exponent; nothing, with dW untouched, where a factor
// is not finite, no row has a nonzero product, or the largest row's products reach
// 2^(at - 2 band): a product formed at 2^at then lost nothing next to them.
template <class T, class Product>
std::optional<std::int64_t> rescaled_weight_grad(const ProductRows<T>& p, std::int64_t at,
                                                 std::size_t chunk, Product&& product) {
  constexpr int band = std::numeric_limits<T>::max_exponent / 5;
  // Row r's largest |D| (its exponent in the row's mantissas, and true) and |M|; false for
  // a row without products.
  struct Exps {
    int d = 0, m = 0;
    std::int64_t d_true = 0;
    bool finite = true;
  };
  auto exps = [&](std::size_t r, Exps& e) {
    const std::int64_t g = p.exp ? p.exp[r / p.group] : 0;
    if (g == kZeroRows) return false;
    MaxAbs md;
    for (const ColumnRun& c : *p.runs) {
      const MaxAbs s = max_abs(p.d + r * p.ldd + c.col, c.width);
      md.value = std::max(md.value, s.value);
      md.finite = md.finite && s.finite;
    }
    const MaxAbs mm = max_abs(p.m + r * p.width, p.width);
    e.finite = md.finite && mm.finite;
    if (!e.finite || md.value == 0 || mm.value == 0) return false;
    e.d = exponent_of(md.value);
    e.m = exponent_of(mm.value);
    e.d_true = g + e.d;
    return true;
  };
  std::optional<std::int64_t> top;
  Exps e;
  for (std::size_t r = 0; r < p.rows; ++r) {
    const bool has = exps(r, e);
    if (!e.finite) return std::nullopt;
    if (has) top = std::max(top.value_or(e.d_true + e.m), e.d_true + e.m);
  }
  if (!top || *top - at >= -2 * band) return std::nullopt;
  chunk = std::clamp<std::size_t>(chunk, 1, p.rows);
  std::vector<T> ds(chunk * p.ldd), ms(chunk * p.width);
  for (std::size_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const std::size_t n = std::min(chunk, p.rows - r0);
    for (std::size_t i = 0; i < n; ++i) {
      T* d = ds.data() + i * p.ldd;
      T* v = ms.data() + i * p.width;
      const bool has = exps(r0 + i, e);
      for (const ColumnRun& c : *p.runs) {
        if (has) {
          const T* src = p.d + (r0 + i) * p.ldd + c.col;
          std::copy(src, src + c.width, d + c.col);
          scale_pow2(d + c.col, c.width, -e.d);
        } else {
          std::fill(d + c.col, d + c.col + c.width, T(0));
        }
      }
      if (!has) {
        std::fill(v, v + p.width, T(0));
        continue;
      }
      std::copy(p.m + (r0 + i) * p.width, p.m + (r0 + i + 1) * p.width, v);
      scale_pow2(v, p.width,
                 static_cast<int>(std::clamp<std::int64_t>(e.d_true - *top, -100000, 100000)));
    }
    product(static_cast<const T*>(ds.data()), static_cast<const T*>(ms.data()), n, r0 == 0);
  }
  return top;
}

}  // namespace gradchain
