"""Triton kernels and their launchers (installed as ``vcrd.kernels``)."""
