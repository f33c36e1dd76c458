// Basis ops: products between a stored basis V [m, n] and a small working block W [k, n].
//
//   basis_dot        C[m, k] = V W^T                      (reads V once)
//   basis_update     W -= C^T V          (in place)       (reads V once)
//   reorthogonalize  CGS2 of W against the rows of V, second pass decided per row (DGKS)
//
// V: storage dtype (float32, bfloat16, float16, float64), any row stride >= n.
// W: float32 or float64, row stride >= n, must not overlap V.
// C, norms: contiguous, in the accumulation dtype `acc` (float32 or float64).
// The CPU and CUDA versions have the same names and meaning; CUDA adds device and stream.
#pragma once

#include <cstdint>

#include "common.h"

namespace hessfast {

namespace cpu {
void basis_dot(const Mat& V, const Mat& W, std::uintptr_t c, int acc, int64_t n);
void basis_update(const Mat& V, std::uintptr_t c, int acc, const Mat& W, int64_t n);
// norms [3, k]: ||w|| before, after the first pass, and final (== after-first when the row
// did not need a second pass). c [m, k] = C1 + C2 (C2 = 0 on rows without a second pass).
void reorthogonalize(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int acc,
                     int64_t n, double eta);
}  // namespace cpu

namespace cuda {
void basis_dot(const Mat& V, const Mat& W, std::uintptr_t c, int acc, int64_t n, int device,
               std::uintptr_t stream);
void basis_update(const Mat& V, std::uintptr_t c, int acc, const Mat& W, int64_t n, int device,
                  std::uintptr_t stream);
void reorthogonalize(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int acc,
                     int64_t n, double eta, int device, std::uintptr_t stream);
}  // namespace cuda

}  // namespace hessfast
