"""Type stub of :mod:`hessfast._C`, the native kernels (csrc/bindings.cpp).

The module is torch-agnostic: every matrix arrives as a raw address (``tensor.data_ptr()``),
a row stride and a dtype code, and results are written into buffers the caller allocated.
:mod:`hessfast._native` is its only caller; it validates the tensors first and allocates the
outputs, and :mod:`hessfast.ops` is the public face of these kernels.

Conventions of every kernel below:

* A matrix ``X[rows, n]`` is row-major: element ``(i, t)`` lives at
  ``x + (i * x_ld + t) * itemsize``, with the row stride ``x_ld >= n`` (in elements) whenever
  ``rows > 1``, and unit stride inside a row.
* dtype codes (``*_dtype``, ``acc``): 0 float32, 1 float64, 2 bfloat16, 3 float16. The basis
  ``v`` may be any of them; the working block ``w`` and the accumulation
  dtype ``acc`` of the small outputs are float32 or float64.
* Small outputs (``c``, ``norms``) are contiguous, in ``acc``.
* ``w`` must not overlap ``v``: it is written while ``v`` is read.
* Bad shapes, strides, dtype codes, null pointers or aliasing raise ``ValueError`` (a backstop:
  :mod:`hessfast.ops` checks first). The GIL is released while a kernel runs.

``cuda`` holds the same three kernels with two more arguments, ``device`` (the CUDA device
index) and ``stream`` (a ``cudaStream_t`` as an int); they are enqueued on that stream and
return before they finish. Without the CUDA kernels compiled in, ``cuda`` is an empty module.
"""

from typing import TypedDict

class _BuildInfo(TypedDict):
    """What :func:`build_info` returns (a plain dict at run time)."""

    compiler: str
    """C++ compiler id and version, e.g. ``"GNU 12.2.0"``."""
    flags: str
    """C++ flags of the kernels, e.g. ``"-O3 -DNDEBUG ... -march=native"``."""
    openmp: int
    """``_OPENMP``: the OpenMP version date, e.g. ``201511``."""
    cuda: str
    """CUDA toolkit version, ``""`` without the CUDA kernels."""
    cuda_archs: str
    """CUDA architectures compiled, e.g. ``"80 90"``; ``""`` without the CUDA kernels."""
    simd: str
    """``"avx512"``, ``"avx2"`` or ``"baseline"``: the widest x86 SIMD level compiled in."""
    f16c: bool
    """Whether hardware float16 conversion (F16C) was compiled in."""

def cuda_compiled() -> bool:
    """True when the CUDA kernels were compiled into this module."""

def openmp_threads() -> int:
    """Threads the CPU kernels use (``OMP_NUM_THREADS`` or the core count)."""

def build_info() -> _BuildInfo:
    """Compiler, flags, SIMD level and CUDA toolkit version (``""`` without CUDA) of this
    build."""

class _CpuKernels:
    """The submodule ``hessfast._C.cpu``: OpenMP CPU kernels. (A module at run time; this
    class exists only in the stub, to type its functions.)"""

    def basis_dot(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        c: int,
        acc: int,
        m: int,
        k: int,
        n: int,
    ) -> None:
        """``C[m, k] = V[m, n] W[k, n]^T``; ``c`` is contiguous ``[m, k]`` in ``acc``.

        Reads the basis ``V`` once.
        """

    def basis_update(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        c: int,
        acc: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        m: int,
        k: int,
        n: int,
    ) -> None:
        """``W[k, n] -= C[m, k]^T V[m, n]`` in place, arithmetic in ``acc``.

        Reads the basis ``V`` once.
        """

    def reorthogonalize(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        c: int,
        norms: int,
        acc: int,
        m: int,
        k: int,
        n: int,
        eta: float,
    ) -> None:
        """Classical Gram-Schmidt of ``W[k, n]`` against the rows of ``V[m, n]``, in place,
        with a second pass for each row ``j`` of ``W`` whose norm fell below ``eta`` times
        its norm before (DGKS; ``eta >= 0``: 0 never repeats, ``inf`` always does).

        Writes ``c`` ``[m, k]`` = the coefficients of both passes added, and ``norms``
        ``[3, k]`` = each row's norm before, after the first pass, and final (equal to the
        second when the row needed no second pass).
        """

class _CudaKernels:
    """The submodule ``hessfast._C.cuda``: the same kernels on a CUDA device, each with two
    trailing arguments: ``device`` (device index) and ``stream`` (``cudaStream_t`` as an int;
    the kernels are enqueued there and return at once). Empty (none of these functions)
    when the module was built without CUDA: check :func:`cuda_compiled` first. (A module at
    run time; this class exists only in the stub.)"""

    def basis_dot(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        c: int,
        acc: int,
        m: int,
        k: int,
        n: int,
        device: int,
        stream: int,
    ) -> None:
        """:meth:`_CpuKernels.basis_dot` on ``device``, enqueued on ``stream``."""

    def basis_update(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        c: int,
        acc: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        m: int,
        k: int,
        n: int,
        device: int,
        stream: int,
    ) -> None:
        """:meth:`_CpuKernels.basis_update` on ``device``, enqueued on ``stream``."""

    def reorthogonalize(
        self,
        v: int,
        v_ld: int,
        v_dtype: int,
        w: int,
        w_ld: int,
        w_dtype: int,
        c: int,
        norms: int,
        acc: int,
        m: int,
        k: int,
        n: int,
        eta: float,
        device: int,
        stream: int,
    ) -> None:
        """:meth:`_CpuKernels.reorthogonalize` on ``device``, enqueued on ``stream``."""

cpu: _CpuKernels
cuda: _CudaKernels
