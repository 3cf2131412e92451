// pybind11 module lowrank_kernels._C: the host entry points of ops.h, keyword arguments named as there.
// Called only through lowrank_kernels/_cuda_ext.py, whose wrappers check shapes, dtypes and devices first.
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowrank_kernels CUDA C++ fallback kernels (raw device pointers, int64 strides, dtype codes, stream)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(lowrank::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(lowrank::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(lowrank::kBFloat16);
  m.attr("MASK_NONE") = static_cast<int>(lowrank::kMaskNone);
  m.attr("MASK_A") = static_cast<int>(lowrank::kMaskA);
  m.attr("MASK_B") = static_cast<int>(lowrank::kMaskB);
  m.attr("MASK_C") = static_cast<int>(lowrank::kMaskC);

  m.def("gemm", &lowrank::gemm, "C = epilogue(opA opB), fp32 accumulation (see csrc/gemm.cu)", "M"_a, "N"_a, "K"_a,
        "a"_a, "a_dtype"_a, "a_s0"_a, "a_s1"_a, "b"_a, "b_dtype"_a, "b_s0"_a, "b_s1"_a, "c"_a, "c_dtype"_a, "c_s0"_a,
        "c_s1"_a, "alpha"_a, "cin"_a, "cin_s0"_a, "cin_s1"_a, "beta"_a, "k_scale"_a, "row_scale"_a, "col_scale"_a,
        "post_scale"_a, "bias"_a, "mask_on"_a, "seed"_a, "p"_a, "mask_cols"_a, "stream"_a);
  m.def("dropout_mask", &lowrank::dropout_mask, "float32 dropout mask (0 or 1/(1-p)) of an [M, K] x", "M"_a, "K"_a,
        "out"_a, "out_s0"_a, "out_s1"_a, "seed"_a, "p"_a, "stream"_a);
  m.def("dropout_combine", &lowrank::dropout_combine, "out = base + mask(src)", "dtype"_a, "M"_a, "K"_a, "base"_a,
        "base_s0"_a, "base_s1"_a, "src"_a, "src_s0"_a, "src_s1"_a, "out"_a, "out_s0"_a, "out_s1"_a, "scale_kept"_a,
        "seed"_a, "p"_a, "stream"_a);
  m.def("dora_dropout_output", &lowrank::dora_dropout_output, "out = base + g z - dz_scale dz", "dtype"_a, "M"_a,
        "N"_a, "base"_a, "base_s0"_a, "base_s1"_a, "z"_a, "z_s0"_a, "z_s1"_a, "dz"_a, "dz_s0"_a, "dz_s1"_a,
        "dz_scale"_a, "g"_a, "out"_a, "out_s0"_a, "out_s1"_a, "stream"_a);
  m.def("col_dot", &lowrank::col_dot, "out[n] = sum_m P[m, n] Q[m, n]", "dtype"_a, "M"_a, "N"_a, "p"_a, "p_s0"_a,
        "p_s1"_a, "q"_a, "q_s0"_a, "q_s1"_a, "out"_a, "stream"_a);
  m.def("dora_norm_finish", &lowrank::dora_norm_finish, "DoRA's squared row norm and its cancellation reference",
        "dtype"_a, "N"_a, "K"_a, "rank"_a, "w"_a, "w_s0"_a, "w_s1"_a, "w0sq"_a, "b"_a, "b_s0"_a, "b_s1"_a, "c"_a,
        "c_s0"_a, "c_s1"_a, "q"_a, "q_s0"_a, "q_s1"_a, "norm_sq"_a, "reference_sq"_a, "stream"_a);
  m.def("multi_lora_shrink", &lowrank::multi_lora_shrink, "per-row gather shrink", "dtype"_a, "M"_a, "K"_a,
        "capacity"_a, "max_rank"_a, "x"_a, "x_s0"_a, "x_s1"_a, "a"_a, "a_s0"_a, "a_s1"_a, "a_s2"_a, "row_slot"_a,
        "row_rank"_a, "row_scale"_a, "t"_a, "t_s0"_a, "t_s1"_a, "stream"_a);
  m.def("multi_lora_expand", &lowrank::multi_lora_expand, "per-row gather expand-and-add, in place", "dtype"_a, "M"_a,
        "N"_a, "capacity"_a, "max_rank"_a, "t"_a, "t_s0"_a, "t_s1"_a, "b"_a, "b_s0"_a, "b_s1"_a, "b_s2"_a,
        "row_slot"_a, "row_rank"_a, "dora_slots"_a, "g"_a, "g_s0"_a, "g_s1"_a, "bias"_a, "y"_a, "y_s0"_a, "y_s1"_a,
        "stream"_a);
  m.def("multi_lora_segment_grad", &lowrank::multi_lora_segment_grad,
        "per-adapter weight gradient over each slot's rows (segmented, deterministic)", "u_dtype"_a, "v_dtype"_a, "M"_a,
        "P"_a, "Q"_a, "capacity"_a, "u"_a, "u_s0"_a, "u_s1"_a, "v"_a, "v_s0"_a, "v_s1"_a, "sorted_rows"_a,
        "slot_rows"_a, "seed"_a, "p"_a, "out"_a, "out_s0"_a, "out_s1"_a, "out_s2"_a, "stream"_a);
}
