"""Kernels and their launchers: Triton (``lora``, ``dora``, ``multi_lora``) and the CUDA C++ extension's (``cuda_ext``,
over ``lowrank_kernels._C`` built from csrc/). Imported lazily by the ops layer: importing the package needs neither."""
