// Small memory-bound kernels around the GEMM: the dropout mask and its elementwise uses, column dot products
// (DoRA's dm), DoRA's row-norm finish and its dropout-form output. One thread per element (grid-stride) unless said.
#include "common.cuh"

namespace lowrank {
namespace {

constexpr int EW_THREADS = 256;

// Grid for a grid-stride loop over `n` elements: enough blocks to fill a GPU, never more than the grid allows.
inline unsigned ew_blocks(int64_t n) {
  const int64_t blocks = cdiv(n, EW_THREADS);
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

__global__ void dropout_mask_kernel(int64_t M, int64_t K, float* out, int64_t s0, int64_t s1, Dropout d) {
  const int64_t total = M * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    out[m * s0 + k * s1] = d.keep(m, k) ? d.inv_keep : 0.0f;
  }
}

template <typename T>
__global__ void dropout_combine_kernel(int64_t M, int64_t K, const T* base, int64_t base_s0, int64_t base_s1,
                                       const T* src, int64_t src_s0, int64_t src_s1, T* out, int64_t out_s0,
                                       int64_t out_s1, float factor, Dropout d) {
  const int64_t total = M * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    const float kept = d.keep(m, k) ? to_float(src[m * src_s0 + k * src_s1]) * factor : 0.0f;
    // Without base, the kept value is stored as is: factor 1 gives x with its dropped entries zeroed, exactly.
    out[m * out_s0 + k * out_s1] =
        from_float<T>(base != nullptr ? to_float(base[m * base_s0 + k * base_s1]) + kept : kept);
  }
}

template <typename T>
__global__ void dora_dropout_output_kernel(int64_t M, int64_t N, const T* base, int64_t base_s0, int64_t base_s1,
                                           const T* z, int64_t z_s0, int64_t z_s1, const T* dz, int64_t dz_s0,
                                           int64_t dz_s1, float dz_scale, const float* g, T* out, int64_t out_s0,
                                           int64_t out_s1) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    const float v = to_float(base[m * base_s0 + n * base_s1]) + g[n] * to_float(z[m * z_s0 + n * z_s1]) -
                    dz_scale * to_float(dz[m * dz_s0 + n * dz_s1]);
    out[m * out_s0 + n * out_s1] = from_float<T>(v);
  }
}

// Block: 32 columns x 8 row lanes; each lane strides over rows, then a fixed-order sum over the 8 lanes (no atomics:
// the result does not depend on scheduling).
constexpr int CD_COLS = 32, CD_ROWS = 8;

template <typename T>
__global__ void col_dot_kernel(int64_t M, int64_t N, const T* p, int64_t p_s0, int64_t p_s1, const T* q,
                               int64_t q_s0, int64_t q_s1, float* out) {
  __shared__ float partial[CD_ROWS][CD_COLS + 1];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * CD_COLS + threadIdx.x;
  float acc = 0.0f;
  if (n < N) {
    for (int64_t m = threadIdx.y; m < M; m += CD_ROWS) {
      acc = fmaf(to_float(p[m * p_s0 + n * p_s1]), to_float(q[m * q_s0 + n * q_s1]), acc);
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < CD_ROWS; ++r) total += partial[r][threadIdx.x];
    out[n] = total;
  }
}

// One warp per row n: DoRA's squared row norm from its factored parts, and the sum it is judged against.
template <typename T>
__global__ void dora_norm_finish_kernel(int64_t N, int64_t K, int64_t rank, const T* w, int64_t w_s0, int64_t w_s1,
                                        const float* w0sq, const T* b, int64_t b_s0, int64_t b_s1, const float* c,
                                        int64_t c_s0, int64_t c_s1, const float* q, int64_t q_s0, int64_t q_s1,
                                        float* norm_sq, float* reference_sq) {
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;  // uniform across the warp: every lane of a warp has the same n
  float sq = 0.0f;
  if (w0sq == nullptr) {
    for (int64_t k = lane; k < K; k += 32) {
      const float v = to_float(w[n * w_s0 + k * w_s1]);
      sq = fmaf(v, v, sq);
    }
  }
  float cross = 0.0f, quad = 0.0f;  // B_n . C_n and B_n . Q_n
  for (int64_t r = lane; r < rank; r += 32) {
    const float bv = to_float(b[n * b_s0 + r * b_s1]);
    cross = fmaf(bv, c[n * c_s0 + r * c_s1], cross);
    quad = fmaf(bv, q[n * q_s0 + r * q_s1], quad);
  }
  sq = warp_sum(sq);
  cross = warp_sum(cross);
  quad = warp_sum(quad);
  if (lane == 0) {
    const float w0 = w0sq != nullptr ? w0sq[n] : sq;
    norm_sq[n] = w0 + cross;  // unclamped: the caller judges cancellation, then takes the root
    reference_sq[n] = w0 + quad;
  }
}

}  // namespace

void dropout_mask(int64_t M, int64_t K, uintptr_t out, int64_t out_s0, int64_t out_s1, uint32_t seed, double p,
                  uintptr_t stream) {
  require(M >= 0 && K >= 0 && p >= 0.0 && p < 1.0, "dropout_mask: need M, K >= 0 and 0 <= p < 1");
  if (M == 0 || K == 0) return;
  dropout_mask_kernel<<<ew_blocks(M * K), EW_THREADS, 0, as_stream(stream)>>>(
      M, K, reinterpret_cast<float*>(out), out_s0, out_s1, make_dropout(seed, p, K));
  check_launch("dropout_mask_kernel");
}

void dropout_combine(int dtype, int64_t M, int64_t K, uintptr_t base, int64_t base_s0, int64_t base_s1,
                     uintptr_t src, int64_t src_s0, int64_t src_s1, uintptr_t out, int64_t out_s0, int64_t out_s1,
                     bool scale_kept, uint32_t seed, double p, uintptr_t stream) {
  require(M >= 0 && K >= 0 && p >= 0.0 && p < 1.0, "dropout_combine: need M, K >= 0 and 0 <= p < 1");
  check_dtype(dtype, "dropout_combine");
  if (M == 0 || K == 0) return;
  const Dropout d = make_dropout(seed, p, K);
  const float factor = scale_kept ? d.inv_keep : 1.0f;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dropout_combine_kernel<T><<<ew_blocks(M * K), EW_THREADS, 0, as_stream(stream)>>>(
        M, K, reinterpret_cast<const T*>(base), base_s0, base_s1, reinterpret_cast<const T*>(src), src_s0, src_s1,
        reinterpret_cast<T*>(out), out_s0, out_s1, factor, d);
  });
  check_launch("dropout_combine_kernel");
}

void dora_dropout_output(int dtype, int64_t M, int64_t N, uintptr_t base, int64_t base_s0, int64_t base_s1,
                         uintptr_t z, int64_t z_s0, int64_t z_s1, uintptr_t dz, int64_t dz_s0, int64_t dz_s1,
                         double dz_scale, uintptr_t g, uintptr_t out, int64_t out_s0, int64_t out_s1,
                         uintptr_t stream) {
  require(M >= 0 && N >= 0, "dora_dropout_output: negative size");
  check_dtype(dtype, "dora_dropout_output");
  if (M == 0 || N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dora_dropout_output_kernel<T><<<ew_blocks(M * N), EW_THREADS, 0, as_stream(stream)>>>(
        M, N, reinterpret_cast<const T*>(base), base_s0, base_s1, reinterpret_cast<const T*>(z), z_s0, z_s1,
        reinterpret_cast<const T*>(dz), dz_s0, dz_s1, static_cast<float>(dz_scale), reinterpret_cast<const float*>(g),
        reinterpret_cast<T*>(out), out_s0, out_s1);
  });
  check_launch("dora_dropout_output_kernel");
}

void col_dot(int dtype, int64_t M, int64_t N, uintptr_t p, int64_t p_s0, int64_t p_s1, uintptr_t q, int64_t q_s0,
             int64_t q_s1, uintptr_t out, uintptr_t stream) {
  require(M >= 0 && N >= 0, "col_dot: negative size");
  require(cdiv(N, CD_COLS) <= 2147483647LL, "col_dot: N too large");
  check_dtype(dtype, "col_dot");
  if (N == 0) return;
  const dim3 block(CD_COLS, CD_ROWS);
  const unsigned blocks = static_cast<unsigned>(cdiv(N, CD_COLS));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    col_dot_kernel<T><<<blocks, block, 0, as_stream(stream)>>>(M, N, reinterpret_cast<const T*>(p), p_s0, p_s1,
                                                               reinterpret_cast<const T*>(q), q_s0, q_s1,
                                                               reinterpret_cast<float*>(out));
  });
  check_launch("col_dot_kernel");
}

void dora_norm_finish(int dtype, int64_t N, int64_t K, int64_t rank, uintptr_t w, int64_t w_s0, int64_t w_s1,
                      uintptr_t w0sq, uintptr_t b, int64_t b_s0, int64_t b_s1, uintptr_t c, int64_t c_s0,
                      int64_t c_s1, uintptr_t q, int64_t q_s0, int64_t q_s1, uintptr_t norm_sq,
                      uintptr_t reference_sq, uintptr_t stream) {
  require(N >= 0 && K >= 0 && rank >= 0, "dora_norm_finish: negative size");
  require(cdiv(N * 32, EW_THREADS) <= 2147483647LL, "dora_norm_finish: N too large");
  check_dtype(dtype, "dora_norm_finish");
  if (N == 0) return;
  const unsigned blocks = static_cast<unsigned>(cdiv(N * 32, EW_THREADS));  // 8 rows (warps) per block
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dora_norm_finish_kernel<T><<<blocks, EW_THREADS, 0, as_stream(stream)>>>(
        N, K, rank, reinterpret_cast<const T*>(w), w_s0, w_s1, reinterpret_cast<const float*>(w0sq),
        reinterpret_cast<const T*>(b), b_s0, b_s1, reinterpret_cast<const float*>(c), c_s0, c_s1,
        reinterpret_cast<const float*>(q), q_s0, q_s1, reinterpret_cast<float*>(norm_sq),
        reinterpret_cast<float*>(reference_sq));
  });
  check_launch("dora_norm_finish_kernel");
}

}  // namespace lowrank
