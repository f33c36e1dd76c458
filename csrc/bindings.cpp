// The only pybind11 file: exposes the CPU ops as hessfast._C.cpu.<op> and, when compiled, the CUDA
// ops as hessfast._C.cuda.<op> (same names and arguments, plus device index and stream handle).
// Pointers arrive as Python ints (tensor.data_ptr()); hessfast/_native.py is the only caller.
#include <omp.h>
#include <pybind11/pybind11.h>

#include "basis.h"

namespace py = pybind11;
using hessfast::make_mat;
using hessfast::Mat;
using std::uintptr_t;

namespace {

template <typename... Ex>
struct ExtraArgs {};

// Ex: types of the trailing arguments (none on CPU; device, stream on CUDA), named by `extra`.
template <typename... Ex, typename Dot, typename Update, typename Reorth, typename... Names>
void def_ops(py::module_& m, ExtraArgs<Ex...>, Dot dot, Update update, Reorth reorth,
             const char* extra_doc, Names... extra) {
  const auto gil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "basis_dot",
      [dot](uintptr_t v, int64_t v_ld, int v_dtype, uintptr_t w, int64_t w_ld, int w_dtype,
            uintptr_t c, int acc, int64_t m_, int64_t k, int64_t n, Ex... ex) {
        dot(make_mat(v, m_, v_ld, v_dtype), make_mat(w, k, w_ld, w_dtype), c, acc, n, ex...);
      },
      gil, py::arg("v"), py::arg("v_ld"), py::arg("v_dtype"), py::arg("w"), py::arg("w_ld"),
      py::arg("w_dtype"), py::arg("c"), py::arg("acc"), py::arg("m"), py::arg("k"), py::arg("n"),
      py::arg(extra)...,
      (std::string("C[m, k] = V[m, n] W[k, n]^T; C contiguous in the accumulation dtype.") +
       extra_doc).c_str());
  m.def(
      "basis_update",
      [update](uintptr_t v, int64_t v_ld, int v_dtype, uintptr_t c, int acc, uintptr_t w,
               int64_t w_ld, int w_dtype, int64_t m_, int64_t k, int64_t n,
               Ex... ex) {
        update(make_mat(v, m_, v_ld, v_dtype), c, acc, make_mat(w, k, w_ld, w_dtype), n, ex...);
      },
      gil, py::arg("v"), py::arg("v_ld"), py::arg("v_dtype"), py::arg("c"), py::arg("acc"),
      py::arg("w"), py::arg("w_ld"), py::arg("w_dtype"), py::arg("m"), py::arg("k"), py::arg("n"),
      py::arg(extra)...,
      (std::string("W[k, n] -= C[m, k]^T V[m, n] in place.") + extra_doc).c_str());
  m.def(
      "reorthogonalize",
      [reorth](uintptr_t v, int64_t v_ld, int v_dtype, uintptr_t w, int64_t w_ld, int w_dtype,
               uintptr_t c, uintptr_t norms, int acc, int64_t m_, int64_t k, int64_t n,
               double eta, Ex... ex) {
        reorth(make_mat(v, m_, v_ld, v_dtype), make_mat(w, k, w_ld, w_dtype), c, norms, acc, n,
               eta, ex...);
      },
      gil, py::arg("v"), py::arg("v_ld"), py::arg("v_dtype"), py::arg("w"), py::arg("w_ld"),
      py::arg("w_dtype"), py::arg("c"), py::arg("norms"), py::arg("acc"), py::arg("m"),
      py::arg("k"), py::arg("n"), py::arg("eta"), py::arg(extra)...,
      (std::string("CGS2 of W against V with a per-row DGKS second pass; writes C[m, k] = C1 + C2 "
                   "and norms[3, k] (before, after pass 1, final).") +
       extra_doc)
          .c_str());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hessfast native kernels (torch-agnostic: raw pointers, shapes, dtype codes)";
  m.def("cuda_compiled", []() {
#ifdef HESSFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this module.");
  m.def("openmp_threads", []() { return omp_get_max_threads(); },
        "Threads the CPU kernels use (OMP_NUM_THREADS or the core count).");
  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = HESSFAST_CXX_COMPILER;
    d["flags"] = HESSFAST_CXX_FLAGS;
    d["openmp"] = _OPENMP;
    d["cuda"] = std::string(HESSFAST_CUDA_VERSION);
    d["cuda_archs"] = std::string(HESSFAST_CUDA_ARCHS);
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#else
    d["simd"] = "baseline";
#endif
#if defined(__F16C__)
    d["f16c"] = true;
#else
    d["f16c"] = false;
#endif
    return d;
  }, "Compiler, flags, SIMD level and CUDA toolkit version ('' without CUDA) of this build.");

  py::module_ cpu = m.def_submodule("cpu", "OpenMP CPU kernels");
  def_ops(cpu, ExtraArgs<>{}, &hessfast::cpu::basis_dot, &hessfast::cpu::basis_update,
          &hessfast::cpu::reorthogonalize, "");

  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (empty when built without CUDA)");
#ifdef HESSFAST_WITH_CUDA
  def_ops(cuda, ExtraArgs<int, uintptr_t>{}, &hessfast::cuda::basis_dot, &hessfast::cuda::basis_update,
          &hessfast::cuda::reorthogonalize,
          " Runs on the given device and stream (asynchronously).", "device", "stream");
#else
  (void)cuda;
#endif
}
