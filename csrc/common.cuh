// Shared device helpers of the CUDA fallback kernels: dtype conversion, the dropout hash, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace lowrank {

// ---- element types: every kernel loads to float32, accumulates in float32 and rounds once on store --------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the 32 lanes of a warp (every lane gets the total); all 32 lanes must be active.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- dropout: murmur3's finaliser over (seed, row * cols + col), bit-identical to ops/lora/naive.dropout_mask -----

__host__ __device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The mask of an [rows, cols] x: element (row, col) is kept iff u >= p, u = the hash's top 24 bits / 2^24.
struct Dropout {
  uint32_t key;    // fmix32(seed ^ 0x9E3779B9)
  float p;         // drop probability, rounded to float32 (as the reference and Triton compare it)
  float inv_keep;  // 1 / (1 - p) in float32: the factor of kept entries
  int64_t cols;    // x's column count: the hash position is row * cols + col

  __device__ __forceinline__ bool keep(int64_t row, int64_t col) const {
    const uint64_t flat = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(col);
    const uint32_t lo = static_cast<uint32_t>(flat);
    const uint32_t hi = static_cast<uint32_t>(flat >> 32);
    const uint32_t bits = fmix32(fmix32(lo ^ key) ^ hi);
    const float uniform = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);  // 24 bits: exact in float32
    return uniform >= p;
  }
};

inline Dropout make_dropout(uint32_t seed, double p, int64_t cols) {
  Dropout d;
  d.key = fmix32(seed ^ 0x9E3779B9u);
  d.p = static_cast<float>(p);
  d.inv_keep = 1.0f / (1.0f - d.p);  // float32 arithmetic, as the reference's factor
  d.cols = cols;
  return d;
}

// ---- host-side checks ----------------------------------------------------------------------------------------

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// After a launch: a bad configuration or a missing kernel image (wrong arch) surfaces here as a RuntimeError.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lowrank_kernels._C: launching ") + kernel + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("lowrank_kernels._C: " + what);
}

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32:
      return "float32";
    case kFloat16:
      return "float16";
    case kBFloat16:
      return "bfloat16";
    default:
      return "unknown";
  }
}

// A dtype code the kernels take; entry points check it before any early return (size 0), so CPU tests see it.
inline void check_dtype(int code, const char* entry) {
  require(code == kFloat32 || code == kFloat16 || code == kBFloat16,
          std::string(entry) + ": unsupported dtype code " + std::to_string(code) + " (0 float32, 1 float16, 2 bfloat16)");
}

// Calls f(T{}) for the element type of dtype code `code` (float32 / float16 / bfloat16).
template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32:
      f(float{});
      return;
    case kFloat16:
      f(__half{});
      return;
    case kBFloat16:
      f(__nv_bfloat16{});
      return;
    default:
      throw std::invalid_argument("lowrank_kernels._C: unsupported dtype code " + std::to_string(code) +
                                  " (0 float32, 1 float16, 2 bfloat16)");
  }
}

}  // namespace lowrank
