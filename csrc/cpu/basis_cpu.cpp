// CPU basis ops (OpenMP). See basis.h for the math and engine.h for the blocking.
#include <cmath>
#include <vector>

#include "basis.h"
#include "cpu/engine.h"

namespace hessfast {
namespace cpu {

namespace {

void check_pair(const Mat& V, const Mat& W, int acc, int64_t n) {
  check_mat(V, n, "V", /*storage_ok=*/true);
  check_mat(W, n, "W", /*storage_ok=*/false);
  check(valid_acc_dtype(acc), "accumulation dtype must be float32 or float64");
  check(!overlaps(V, W, n), "W must not alias V");
}

}  // namespace

void basis_dot(const Mat& V, const Mat& W, std::uintptr_t c, int acc, int64_t n) {
  check_pair(V, W, acc, n);
  const int64_t m = V.rows, k = W.rows;
  if (m == 0 || k == 0) return;
  check(c != 0, "C: null data pointer");
  std::vector<double> C(static_cast<size_t>(m * k), 0.0);
  if (n > 0) {
    if (acc == kFloat32)
      dot_pass<float>(rows_of(V), rows_of(W), n, C.data(), nullptr);
    else
      dot_pass<double>(rows_of(V), rows_of(W), n, C.data(), nullptr);
  }
  write_as(c, acc, C.data(), m * k);
}

template <typename AT>
static void update_impl(const Mat& V, std::uintptr_t c, int acc, const Mat& W, int64_t n) {
  const std::vector<AT> coef = read_as<AT>(c, acc, V.rows * W.rows);
  const Rows vr = rows_of(V);
  update_pass<AT>({UpdateSource<AT>{&vr, coef.data()}}, rows_of(W), n, nullptr, nullptr);
}

void basis_update(const Mat& V, std::uintptr_t c, int acc, const Mat& W, int64_t n) {
  check_pair(V, W, acc, n);
  if (V.rows == 0 || W.rows == 0 || n == 0) return;
  check(c != 0, "C: null data pointer");
  if (acc == kFloat32)
    update_impl<float>(V, c, acc, W, n);
  else
    update_impl<double>(V, c, acc, W, n);
}

// CGS2 with a per-row DGKS test: pass 1 (C1 = V W^T, ||w||_before fused into the dot pass;
// W -= C1^T V, ||w||_after fused into the update pass). Rows with ||w||_after < eta ||w||_before
// lost most of their length to the projection, so rounding in C1 may leave O(eps ||w||_before)
// components along V: they get a second pass, computed on that subset of rows only (the pass
// still reads V once; untouched rows are not rewritten).
template <typename AT>
static void reorth_impl(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int acc,
                        int64_t n, double eta) {
  const int64_t m = V.rows, k = W.rows;
  const Rows vr = rows_of(V);
  const Rows wr = rows_of(W);
  std::vector<double> C1(static_cast<size_t>(m * k), 0.0), before(k, 0.0), after1(k, 0.0);
  dot_pass<AT>(vr, wr, n, C1.data(), before.data());
  // The update uses the coefficients rounded to AT, exactly as returned to the caller.
  std::vector<AT> coef1(C1.size());
  for (size_t e = 0; e < C1.size(); ++e) coef1[e] = static_cast<AT>(C1[e]);
  update_pass<AT>({UpdateSource<AT>{&vr, coef1.data()}}, wr, n, after1.data(), nullptr);

  std::vector<double> fin(after1);
  std::vector<double> total(static_cast<size_t>(m * k));
  for (size_t e = 0; e < total.size(); ++e) total[e] = static_cast<double>(coef1[e]);

  Rows sub;
  sub.dtype = wr.dtype;
  sub.esize = wr.esize;
  std::vector<int64_t> idx;
  for (int64_t j = 0; j < k; ++j) {
    if (std::sqrt(after1[j]) < eta * std::sqrt(before[j])) {
      idx.push_back(j);
      sub.ptr.push_back(wr.ptr[j]);
    }
  }
  if (!idx.empty()) {
    const int64_t ks = static_cast<int64_t>(idx.size());
    std::vector<double> C2(static_cast<size_t>(m * ks), 0.0), after2(ks, 0.0);
    dot_pass<AT>(vr, sub, n, C2.data(), nullptr);
    std::vector<AT> coef2(C2.size());
    for (size_t e = 0; e < C2.size(); ++e) coef2[e] = static_cast<AT>(C2[e]);
    update_pass<AT>({UpdateSource<AT>{&vr, coef2.data()}}, sub, n, after2.data(), nullptr);
    for (int64_t s = 0; s < ks; ++s) {
      fin[idx[s]] = after2[s];
      for (int64_t i = 0; i < m; ++i) total[i * k + idx[s]] += static_cast<double>(coef2[i * ks + s]);
    }
  }
  if (m > 0) write_as(c, acc, total.data(), m * k);
  std::vector<double> nrm(static_cast<size_t>(3 * k));
  for (int64_t j = 0; j < k; ++j) {
    nrm[j] = std::sqrt(before[j]);
    nrm[k + j] = std::sqrt(after1[j]);
    nrm[2 * k + j] = std::sqrt(fin[j]);
  }
  write_as(norms, acc, nrm.data(), 3 * k);
}

void reorthogonalize(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int acc,
                     int64_t n, double eta) {
  check_pair(V, W, acc, n);
  check(eta >= 0.0, "eta must be >= 0");
  if (W.rows == 0) return;
  check(norms != 0, "norms: null data pointer");
  check(V.rows == 0 || c != 0, "C: null data pointer");
  if (acc == kFloat32)
    reorth_impl<float>(V, W, c, norms, acc, n, eta);
  else
    reorth_impl<double>(V, W, c, norms, acc, n, eta);
}

}  // namespace cpu
}  // namespace hessfast
