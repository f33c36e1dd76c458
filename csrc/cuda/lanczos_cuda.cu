// CUDA fused block Lanczos step, same meaning as csrc/cpu/lanczos_cpu.cpp (see lanczos.h).
#include <vector>

#include "cuda/kernels.cuh"
#include "lanczos.h"

namespace hessfast {
namespace cuda {

namespace {

std::vector<char*> row_ptrs(const Mat& a, int64_t j0, int64_t count) {
  std::vector<char*> r(static_cast<size_t>(count));
  for (int64_t j = 0; j < count; ++j)
    r[j] = reinterpret_cast<char*>(a.ptr) + (j0 + j) * a.ld * dtype_size(a.dtype);
  return r;
}

template <typename AT>
void step_impl(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b, std::uintptr_t a,
               std::uintptr_t g, int64_t n, int device, std::uintptr_t stream) {
  Scope sc(device, stream);
  const int64_t k = W.rows;
  AT* A = reinterpret_cast<AT*>(a);
  AT* G = reinterpret_cast<AT*>(g);
  const AT* B = reinterpret_cast<const AT*>(b);
  // Pass 1: A[i, j] = Q_i . W_j
  for (int64_t j0 = 0; j0 < k; j0 += kMaxKB) {
    const int64_t kb = std::min<int64_t>(kMaxKB, k - j0);
    dot_block<AT>(sc, Q, W.dtype, row_ptrs(W, j0, kb), n, A, k, j0, nullptr);
  }
  // Pass 2: W_j -= sum_i A[i, j] Q_i + sum_i B[j, i] Qprev_i (coefficient B^T: strides (1, k)).
  const bool fused_gram = k <= kMaxKB;  // one column block: the Gram is formed in the same pass
  for (int64_t j0 = 0; j0 < k; j0 += kMaxKB) {
    const int64_t kb = std::min<int64_t>(kMaxKB, k - j0);
    update_block<AT>(sc, Q, Qprev, A + j0, k, 1, Qprev.rows > 0 ? B + j0 * k : nullptr, 1, k,
                     W.dtype, row_ptrs(W, j0, kb), n, fused_gram ? G : nullptr, k, fused_gram);
  }
  if (!fused_gram) {
    // k > 8: the Gram needs every row, so it takes one more read of W (G = W W^T as a dot).
    for (int64_t j0 = 0; j0 < k; j0 += kMaxKB) {
      const int64_t kb = std::min<int64_t>(kMaxKB, k - j0);
      dot_block<AT>(sc, W, W.dtype, row_ptrs(W, j0, kb), n, G, k, j0, nullptr);
    }
  }
}

}  // namespace

void lanczos_step(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b, std::uintptr_t a,
                  std::uintptr_t g, int acc, int64_t n, int device, std::uintptr_t stream) {
  check_mat(W, n, "W", /*storage_ok=*/false);
  check_mat(Q, n, "Q", /*storage_ok=*/true);
  check(valid_acc_dtype(acc), "accumulation dtype must be float32 or float64");
  check(Q.rows == W.rows, "Q must have as many rows as W");
  check(!overlaps(Q, W, n), "W must not alias Q");
  if (Qprev.rows > 0) {
    check_mat(Qprev, n, "Qprev", /*storage_ok=*/true);
    check(Qprev.rows == W.rows, "Qprev must have as many rows as W");
    check(Qprev.dtype == Q.dtype, "Qprev must have the dtype of Q");
    check(!overlaps(Qprev, W, n), "W must not alias Qprev");
    check(b != 0, "B: null data pointer");
  }
  if (W.rows == 0) return;
  check(n > 0, "n must be > 0 (ops.py handles empty shapes)");
  check(a != 0 && g != 0, "A/G: null data pointer");
  if (acc == kFloat32)
    step_impl<float>(W, Q, Qprev, b, a, g, n, device, stream);
  else
    step_impl<double>(W, Q, Qprev, b, a, g, n, device, stream);
}

}  // namespace cuda
}  // namespace hessfast
