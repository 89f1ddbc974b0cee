"""Triton kernels of paradis_fast (installed as paradis_fast.kernels)."""
