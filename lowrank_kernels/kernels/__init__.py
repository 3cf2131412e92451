"""Triton kernels and their launchers. Imported lazily by the ops layer: importing the package never needs Triton."""
