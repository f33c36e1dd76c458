// Fused block Lanczos three-term recurrence (row convention: blocks are [k, n], rows are vectors).
//
//   A = Q W^T                       [k, k]  (the caller's W = Q H, so A = Q H Q^T)
//   W <- W - A^T Q - B Qprev        in place; B [k, k] optional (first step has no Qprev)
//   G = W W^T                       [k, k]  Gram of the updated block, for a Cholesky-QR
//
// Two passes over n: pass 1 reads Q, W for A; pass 2 reads Q, Qprev, W, writes W and forms G
// on the updated chunk while it is still in cache.
// Q, Qprev: storage dtype; W: float32/float64; A, B, G: contiguous [k, k] in `acc`.
#pragma once

#include <cstdint>

#include "common.h"

namespace hessfast {

namespace cpu {
void lanczos_step(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b, std::uintptr_t a,
                  std::uintptr_t g, int acc, int64_t n);
}  // namespace cpu

namespace cuda {
void lanczos_step(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b, std::uintptr_t a,
                  std::uintptr_t g, int acc, int64_t n, int device, std::uintptr_t stream);
}  // namespace cuda

}  // namespace hessfast
