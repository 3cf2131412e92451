// Host entry points of the CUDA fallback kernels, bound by bindings.cpp. Plain C++ (no CUDA types), so the
// bindings compile without the CUDA headers.
//
// Every tensor argument is a raw device address (uintptr_t, torch's data_ptr(): the view's first element) with
// int64 strides in elements; dtype codes are 0 float32, 1 float16, 2 bfloat16; `stream` is a cudaStream_t as an
// integer (torch.cuda.current_stream().cuda_stream). Optional vectors are 0 when absent and otherwise contiguous
// float32. Bad arguments raise std::invalid_argument (ValueError in Python), launch failures std::runtime_error.
#pragma once

#include <cstdint>

namespace lowrank {

enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which GEMM operand the dropout mask of x applies to (at that operand's (first, second) index).
enum MaskOn : int { kMaskNone = 0, kMaskA = 1, kMaskB = 2, kMaskC = 3 };

// C[m, n] = epilogue(sum_k opA[m, k] * k_scale[k] * opB[k, n]), fp32 accumulation; see gemm.cu for the epilogue.
// Operand dtypes: with T one of float16/bfloat16, (a, b, c) must be (T, T, f32), (f32, T, T), (f32, T, f32) or
// (T, f32, f32); all float32 is always allowed. Every argument is checked before a size-0 call returns. `cin` (the beta term's input, may alias c) has c's dtype.
void gemm(int64_t M, int64_t N, int64_t K,                                         //
          uintptr_t a, int a_dtype, int64_t a_s0, int64_t a_s1,                    //
          uintptr_t b, int b_dtype, int64_t b_s0, int64_t b_s1,                    //
          uintptr_t c, int c_dtype, int64_t c_s0, int64_t c_s1,                    //
          double alpha, uintptr_t cin, int64_t cin_s0, int64_t cin_s1, double beta,  //
          uintptr_t k_scale, uintptr_t row_scale, uintptr_t col_scale, uintptr_t post_scale, uintptr_t bias,
          int mask_on, uint32_t seed, double p, int64_t mask_cols, uintptr_t stream);

// out [M, K] float32 = the dropout mask of an [M, K] x: 1 / (1 - p) where kept, 0 where dropped.
void dropout_mask(int64_t M, int64_t K, uintptr_t out, int64_t out_s0, int64_t out_s1, uint32_t seed, double p,
                  uintptr_t stream);

// out [M, K] = base + (kept ? src * (scale_kept ? 1 / (1 - p) : 1) : 0), all of dtype `dtype`; base may be 0
// (then out = the masked src; with scale_kept false that is x with its dropped entries zeroed, exact).
void dropout_combine(int dtype, int64_t M, int64_t K, uintptr_t base, int64_t base_s0, int64_t base_s1,
                     uintptr_t src, int64_t src_s0, int64_t src_s1, uintptr_t out, int64_t out_s0, int64_t out_s1,
                     bool scale_kept, uint32_t seed, double p, uintptr_t stream);

// DoRA's dropout-form output, elementwise: out = base + g[n] * z - dz_scale * dz  (all [M, N] of `dtype`).
void dora_dropout_output(int dtype, int64_t M, int64_t N, uintptr_t base, int64_t base_s0, int64_t base_s1,
                         uintptr_t z, int64_t z_s0, int64_t z_s1, uintptr_t dz, int64_t dz_s0, int64_t dz_s1,
                         double dz_scale, uintptr_t g, uintptr_t out, int64_t out_s0, int64_t out_s1,
                         uintptr_t stream);

// out [N] float32 = sum_m P[m, n] * Q[m, n]; P and Q of `dtype`. Deterministic (no atomics).
void col_dot(int dtype, int64_t M, int64_t N, uintptr_t p, int64_t p_s0, int64_t p_s1, uintptr_t q, int64_t q_s0,
             int64_t q_s1, uintptr_t out, uintptr_t stream);

// DoRA's squared row norm from its factored parts, float32 [N] each: norm_sq[n] = w0sq[n] + B_n . C_n and
// reference_sq[n] = w0sq[n] + B_n . Q_n, where C = 2s W0 A^T + s^2 B G and Q = s^2 B G (float32 [N, rank]) and
// w0sq = ||W0_n||^2 (float32 [N], or 0: summed here from W). The caller compares the two (cancellation).
void dora_norm_finish(int dtype, int64_t N, int64_t K, int64_t rank, uintptr_t w, int64_t w_s0, int64_t w_s1,
                      uintptr_t w0sq, uintptr_t b, int64_t b_s0, int64_t b_s1, uintptr_t c, int64_t c_s0,
                      int64_t c_s1, uintptr_t q, int64_t q_s0, int64_t q_s1, uintptr_t norm_sq,
                      uintptr_t reference_sq, uintptr_t stream);

// Multi-adapter gather (per row, BGMV-style): t[m, r] = row_scale[m] * x[m] . A[slot, r] for r < rank(m).
// Rows whose slot is < 0 or >= capacity are skipped; ranks are clamped to [0, max_rank].
void multi_lora_shrink(int dtype, int64_t M, int64_t K, int64_t capacity, int64_t max_rank, uintptr_t x,
                       int64_t x_s0, int64_t x_s1, uintptr_t a, int64_t a_s0, int64_t a_s1, int64_t a_s2,
                       uintptr_t row_slot, uintptr_t row_rank, uintptr_t row_scale, uintptr_t t, int64_t t_s0,
                       int64_t t_s1, uintptr_t stream);

// y[m, n] += sum_{r < rank(m)} t[m, r] B[slot, n, r] in place; DoRA slot: y = g[slot, n] (y - bias + that) + bias.
void multi_lora_expand(int dtype, int64_t M, int64_t N, int64_t capacity, int64_t max_rank, uintptr_t t,
                       int64_t t_s0, int64_t t_s1, uintptr_t b, int64_t b_s0, int64_t b_s1, int64_t b_s2,
                       uintptr_t row_slot, uintptr_t row_rank, uintptr_t dora_slots, uintptr_t g, int64_t g_s0,
                       int64_t g_s1, uintptr_t bias, uintptr_t y, int64_t y_s0, int64_t y_s1, uintptr_t stream);

// Segmented weight gradient (training): out [capacity, P, Q] float32, per slot i the sum over its segment
// [slot_rows[i, 0], slot_rows[i, 1]) of sorted_rows of u[row, p] * drop(v)[row, q] (p > 0: the dropout mask of an
// [M, Q] v, kept entries times 1 / (1 - p)); u and v each float32 or of one 16-bit dtype. Deterministic, no atomics.
void multi_lora_segment_grad(int u_dtype, int v_dtype, int64_t M, int64_t P, int64_t Q, int64_t capacity,
                             uintptr_t u, int64_t u_s0, int64_t u_s1, uintptr_t v, int64_t v_s0, int64_t v_s1,
                             uintptr_t sorted_rows, uintptr_t slot_rows, uint32_t seed, double p, uintptr_t out,
                             int64_t out_s0, int64_t out_s1, int64_t out_s2, uintptr_t stream);

}  // namespace lowrank
