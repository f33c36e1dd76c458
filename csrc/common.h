// Shared by the CPU and CUDA kernels: dtype codes, argument checks, and the host-side description
// of a row-major matrix handed over from Python as a raw pointer.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace hessfast {

// Must match hessfast/_native.py::_DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

inline bool valid_storage_dtype(int d) { return d >= kFloat32 && d <= kFloat16; }
inline bool valid_acc_dtype(int d) { return d == kFloat32 || d == kFloat64; }

inline int64_t dtype_size(int d) {
  switch (d) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kBFloat16:
    case kFloat16: return 2;
    default: throw std::invalid_argument("unknown dtype code " + std::to_string(d));
  }
}

inline const char* dtype_name(int d) {
  switch (d) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    default: return "unknown";
  }
}

// std::invalid_argument becomes ValueError in Python (pybind11's standard translation).
inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("hessfast._C: " + msg);
}

// A row-major [rows, n] matrix: element (i, t) lives at ptr + (i * ld + t) * dtype_size(dtype).
struct Mat {
  std::uintptr_t ptr = 0;
  int64_t rows = 0;
  int64_t ld = 0;
  int dtype = kFloat32;
};

inline Mat make_mat(std::uintptr_t ptr, int64_t rows, int64_t ld, int dtype) {
  Mat a;
  a.ptr = ptr;
  a.rows = rows;
  a.ld = ld;
  a.dtype = dtype;
  return a;
}

// Backstop for what ops.py validates first: a bad call must raise, never crash.
inline void check_mat(const Mat& a, int64_t n, const char* name, bool storage_ok) {
  if (storage_ok) {
    check(valid_storage_dtype(a.dtype), std::string(name) + ": unknown dtype code " +
                                            std::to_string(a.dtype));
  } else {
    check(valid_acc_dtype(a.dtype), std::string(name) + ": dtype must be float32 or float64, got " +
                                        dtype_name(a.dtype));
  }
  check(a.rows >= 0 && n >= 0, std::string(name) + ": negative shape");
  check(a.rows == 0 || n == 0 || a.ptr != 0, std::string(name) + ": null data pointer");
  check(a.rows <= 1 || a.ld >= n, std::string(name) + ": row stride " + std::to_string(a.ld) +
                                      " is smaller than n=" + std::to_string(n));
}

// Byte range [lo, hi) spanned by a matrix; used to refuse W aliasing V (the update reads V while
// writing W, so an overlap would make the result depend on the traversal order).
inline bool overlaps(const Mat& a, const Mat& b, int64_t n) {
  if (a.rows == 0 || b.rows == 0 || n == 0) return false;
  auto span = [n](const Mat& x, std::uintptr_t& lo, std::uintptr_t& hi) {
    lo = x.ptr;
    hi = x.ptr + static_cast<std::uintptr_t>(((x.rows - 1) * x.ld + n) * dtype_size(x.dtype));
  };
  std::uintptr_t alo, ahi, blo, bhi;
  span(a, alo, ahi);
  span(b, blo, bhi);
  return alo < bhi && blo < ahi;
}

}  // namespace hessfast
