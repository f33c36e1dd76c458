// CPU fused block Lanczos step. See lanczos.h for the math.
#include <vector>

#include "cpu/engine.h"
#include "lanczos.h"

namespace hessfast {
namespace cpu {

template <typename AT>
static void step_impl(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b,
                      std::uintptr_t a, std::uintptr_t g, int acc, int64_t n) {
  const int64_t k = W.rows;
  const Rows wr = rows_of(W), qr = rows_of(Q), pr = rows_of(Qprev);
  std::vector<double> A(static_cast<size_t>(k * k), 0.0), G(static_cast<size_t>(k * k), 0.0);
  if (n > 0) dot_pass<AT>(qr, wr, n, A.data(), nullptr);  // A[i, j] = Q_i . W_j
  std::vector<AT> coefA(A.size());
  for (size_t e = 0; e < A.size(); ++e) coefA[e] = static_cast<AT>(A[e]);
  std::vector<UpdateSource<AT>> sources{UpdateSource<AT>{&qr, coefA.data()}};  // W_j -= sum_i A[i,j] Q_i
  std::vector<AT> coefB;
  if (Qprev.rows > 0) {
    // (B Qprev)_j = sum_i B[j, i] Qprev_i, so the update coefficient is B^T.
    const std::vector<AT> B = read_as<AT>(b, acc, k * k);
    coefB.resize(B.size());
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) coefB[i * k + j] = B[j * k + i];
    sources.push_back(UpdateSource<AT>{&pr, coefB.data()});
  }
  if (n > 0) update_pass<AT>(sources, wr, n, nullptr, G.data());
  write_as(a, acc, A.data(), k * k);
  write_as(g, acc, G.data(), k * k);
}

void lanczos_step(const Mat& W, const Mat& Q, const Mat& Qprev, std::uintptr_t b, std::uintptr_t a,
                  std::uintptr_t g, int acc, int64_t n) {
  check_mat(W, n, "W", /*storage_ok=*/false);
  check_mat(Q, n, "Q", /*storage_ok=*/true);
  check(valid_acc_dtype(acc), "accumulation dtype must be float32 or float64");
  check(Q.rows == W.rows, "Q must have as many rows as W");
  check(!overlaps(Q, W, n), "W must not alias Q");
  if (Qprev.rows > 0) {
    check_mat(Qprev, n, "Qprev", /*storage_ok=*/true);
    check(Qprev.rows == W.rows, "Qprev must have as many rows as W");
    check(!overlaps(Qprev, W, n), "W must not alias Qprev");
    check(b != 0, "B: null data pointer");
  }
  if (W.rows == 0) return;
  check(a != 0 && g != 0, "A/G: null data pointer");
  if (acc == kFloat32)
    step_impl<float>(W, Q, Qprev, b, a, g, acc, n);
  else
    step_impl<double>(W, Q, Qprev, b, a, g, acc, n);
}

}  // namespace cpu
}  // namespace hessfast
