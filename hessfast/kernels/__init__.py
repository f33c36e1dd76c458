"""Fused GPU kernels (Triton), each with a plain-torch reference that is also the CPU path.

Triton is imported lazily, inside the functions that launch a kernel: importing this package
never needs Triton.
"""
