// CUDA basis ops, same names and meaning as csrc/cpu/basis_cpu.cpp (see basis.h).
// Every launch goes on the caller's stream; the only host synchronisation is reorthogonalize's
// DGKS decision (k norms copied back), which needs to know which rows get a second pass.
#include <cmath>
#include <vector>

#include "basis.h"
#include "cuda/kernels.cuh"

namespace hessfast {
namespace cuda {

namespace {

void check_pair(const Mat& V, const Mat& W, int acc, int64_t n) {
  check_mat(V, n, "V", /*storage_ok=*/true);
  check_mat(W, n, "W", /*storage_ok=*/false);
  check(valid_acc_dtype(acc), "accumulation dtype must be float32 or float64");
  check(!overlaps(V, W, n), "W must not alias V");
}

std::vector<char*> row_ptrs(const Mat& a, int64_t j0, int64_t count) {
  std::vector<char*> r(static_cast<size_t>(count));
  for (int64_t j = 0; j < count; ++j)
    r[j] = reinterpret_cast<char*>(a.ptr) + (j0 + j) * a.ld * dtype_size(a.dtype);
  return r;
}

template <typename AT>
void dot_impl(const Mat& V, const Mat& W, std::uintptr_t c, int64_t n, int device,
              std::uintptr_t stream) {
  Scope sc(device, stream);
  AT* C = reinterpret_cast<AT*>(c);
  for (int64_t j0 = 0; j0 < W.rows; j0 += kMaxKB) {
    const int64_t kb = std::min<int64_t>(kMaxKB, W.rows - j0);
    dot_block<AT>(sc, V, W.dtype, row_ptrs(W, j0, kb), n, C, W.rows, j0, nullptr);
  }
}

template <typename AT>
void update_impl(const Mat& V, std::uintptr_t c, const Mat& W, int64_t n, int device,
                 std::uintptr_t stream) {
  Scope sc(device, stream);
  const AT* C = reinterpret_cast<const AT*>(c);
  const int64_t k = W.rows;
  for (int64_t j0 = 0; j0 < k; j0 += kMaxKB) {
    const int64_t kb = std::min<int64_t>(kMaxKB, k - j0);
    update_block<AT>(sc, V, Mat{}, C + j0, k, 1, nullptr, 0, 0, W.dtype, row_ptrs(W, j0, kb), n,
                     nullptr, 0, false);
  }
}

template <typename AT>
__global__ void add_columns(AT* C, int64_t m, int64_t k, const AT* C2, int64_t ks,
                            const int64_t* idx) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m * ks) return;
  const int64_t i = e / ks, s = e % ks;
  C[i * k + idx[s]] += C2[e];
}

// CGS2 with a per-row DGKS test; see cpu::reorthogonalize for the reasoning.
template <typename AT>
void reorth_impl(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int64_t n,
                 double eta, int device, std::uintptr_t stream) {
  Scope sc(device, stream);
  const int64_t m = V.rows, k = W.rows;
  AT* C = reinterpret_cast<AT*>(c);
  AT* nrm2 = sc.alloc<AT>(3 * k);  // squared norms: before, after pass 1, final
  for (int64_t j0 = 0; j0 < k; j0 += kMaxKB) {
    const int64_t kb = std::min<int64_t>(kMaxKB, k - j0);
    const auto rows = row_ptrs(W, j0, kb);
    dot_block<AT>(sc, V, W.dtype, rows, n, C, k, j0, nrm2 + j0);
    update_block<AT>(sc, V, Mat{}, C + j0, k, 1, nullptr, 0, 0, W.dtype, rows, n, nrm2 + k + j0,
                     0, false);
  }
  std::vector<AT> host(static_cast<size_t>(2 * k));
  cuda_check(cudaMemcpyAsync(host.data(), nrm2, 2 * k * sizeof(AT), cudaMemcpyDeviceToHost,
                             sc.stream()),
             "cudaMemcpyAsync");
  cuda_check(cudaStreamSynchronize(sc.stream()), "cudaStreamSynchronize");
  std::vector<int64_t> idx;
  for (int64_t j = 0; j < k; ++j)
    if (std::sqrt(static_cast<double>(host[k + j])) < eta * std::sqrt(static_cast<double>(host[j])))
      idx.push_back(j);
  cuda_check(cudaMemcpyAsync(nrm2 + 2 * k, nrm2 + k, k * sizeof(AT), cudaMemcpyDeviceToDevice,
                             sc.stream()),
             "cudaMemcpyAsync");
  const int64_t ks = static_cast<int64_t>(idx.size());
  if (ks > 0) {
    AT* C2 = sc.alloc<AT>(m * ks);
    AT* fin = sc.alloc<AT>(ks);
    int64_t* didx = sc.alloc<int64_t>(ks);
    cuda_check(cudaMemcpyAsync(didx, idx.data(), ks * sizeof(int64_t), cudaMemcpyHostToDevice,
                               sc.stream()),
               "cudaMemcpyAsync");
    std::vector<char*> all(static_cast<size_t>(ks));
    for (int64_t s = 0; s < ks; ++s) all[s] = row_ptrs(W, idx[s], 1)[0];
    for (int64_t s0 = 0; s0 < ks; s0 += kMaxKB) {
      const int64_t kb = std::min<int64_t>(kMaxKB, ks - s0);
      std::vector<char*> rows(all.begin() + s0, all.begin() + s0 + kb);
      dot_block<AT>(sc, V, W.dtype, rows, n, C2, ks, s0, nullptr);
      update_block<AT>(sc, V, Mat{}, C2 + s0, ks, 1, nullptr, 0, 0, W.dtype, rows, n, fin + s0, 0,
                       false);
    }
    add_columns<AT><<<static_cast<int>((m * ks + 255) / 256), 256, 0, sc.stream()>>>(C, m, k, C2,
                                                                                    ks, didx);
    launched("add_columns");
    for (int64_t s = 0; s < ks; ++s)
      cuda_check(cudaMemcpyAsync(nrm2 + 2 * k + idx[s], fin + s, sizeof(AT),
                                 cudaMemcpyDeviceToDevice, sc.stream()),
                 "cudaMemcpyAsync");
    // idx lives on the host stack until here: wait so the host-to-device copy has read it.
    cuda_check(cudaStreamSynchronize(sc.stream()), "cudaStreamSynchronize");
  }
  sqrt_into<AT>(sc, nrm2, reinterpret_cast<AT*>(norms), 3 * k);
}

}  // namespace

void basis_dot(const Mat& V, const Mat& W, std::uintptr_t c, int acc, int64_t n, int device,
               std::uintptr_t stream) {
  check_pair(V, W, acc, n);
  if (V.rows == 0 || W.rows == 0) return;
  check(c != 0, "C: null data pointer");
  check(n > 0, "n must be > 0 (ops.py handles empty shapes)");
  if (acc == kFloat32)
    dot_impl<float>(V, W, c, n, device, stream);
  else
    dot_impl<double>(V, W, c, n, device, stream);
}

void basis_update(const Mat& V, std::uintptr_t c, int acc, const Mat& W, int64_t n, int device,
                  std::uintptr_t stream) {
  check_pair(V, W, acc, n);
  if (V.rows == 0 || W.rows == 0 || n == 0) return;
  check(c != 0, "C: null data pointer");
  if (acc == kFloat32)
    update_impl<float>(V, c, W, n, device, stream);
  else
    update_impl<double>(V, c, W, n, device, stream);
}

void reorthogonalize(const Mat& V, const Mat& W, std::uintptr_t c, std::uintptr_t norms, int acc,
                     int64_t n, double eta, int device, std::uintptr_t stream) {
  check_pair(V, W, acc, n);
  check(eta >= 0.0, "eta must be >= 0");
  if (W.rows == 0) return;
  check(V.rows > 0 && n > 0, "m and n must be > 0 (ops.py handles empty shapes)");
  check(norms != 0 && c != 0, "C/norms: null data pointer");
  if (acc == kFloat32)
    reorth_impl<float>(V, W, c, norms, n, eta, device, stream);
  else
    reorth_impl<double>(V, W, c, norms, n, eta, device, stream);
}

}  // namespace cuda
}  // namespace hessfast
