// Multi-adapter gather matmul, per row (BGMV style): each row reads its own adapter through AdapterBatch's per-row
// metadata (row_slot, row_rank, row_scale). Two launches around the caller's cuBLAS y = x W0^T + bias:
//
//   shrink: t[m, r] = row_scale[m] * sum_k x[m, k] A[slot, r, k]          r < rank(m)      grid (M, R blocks)
//   expand: y[m, n] += sum_{r < rank(m)} t[m, r] B[slot, n, r]                               grid (M, N blocks)
//           (DoRA slot: y = g[slot, n] * (y - bias + that) + bias)
//
// Two launches rather than one fused (row, N-tile) block: a fused block would redo the K-long shrink once per N tile.
// The pools are read once per row, not once per adapter (the Triton kernels group rows by adapter); this is the
// fallback, kept simple. The Python side validates every slot and rank when the batch is built; here a slot outside
// [0, capacity) or a negative one is skipped (the row keeps the base output) and ranks are clamped to [0, max_rank],
// so no id can make a kernel read outside the pool.
//
// Training adds the segmented weight gradient (the backward's dA_i, dB_i and DoRA's dg_i):
//
//   segment_grad: out[i, p, q] = sum over slot i's rows (its segment of sorted_rows) of u[row, p] drop(v)[row, q]
//                 grid (capacity, P tiles, Q tiles), one 16 x 16 output tile per block
//
// Each block walks its adapter's segment once, SEGMENT_TILE rows at a time in order, accumulating in fp32: no
// atomics, deterministic, zero for slots no row uses.
#include "common.cuh"

namespace lowrank {
namespace {

constexpr int SHRINK_WARPS = 8;  // ranks per shrink block: one warp per rank
constexpr int EXPAND_THREADS = 256;

// The row's slot, or -1 when it has none (or a corrupt one); its rank clamped to [0, max_rank].
__device__ __forceinline__ int64_t row_slot_checked(const int32_t* row_slot, int64_t m, int64_t capacity) {
  const int64_t slot = row_slot[m];
  return (slot >= 0 && slot < capacity) ? slot : -1;
}

__device__ __forceinline__ int64_t row_rank_clamped(const int32_t* row_rank, int64_t m, int64_t max_rank) {
  const int64_t r = row_rank[m];
  return r < 0 ? 0 : (r > max_rank ? max_rank : r);
}

template <typename T>
__global__ void __launch_bounds__(SHRINK_WARPS * 32)
    multi_lora_shrink_kernel(int64_t K, int64_t capacity, int64_t max_rank, const T* x, int64_t x_s0, int64_t x_s1,
                             const T* a, int64_t a_s0, int64_t a_s1, int64_t a_s2, const int32_t* row_slot,
                             const int32_t* row_rank, const float* row_scale, float* t, int64_t t_s0, int64_t t_s1) {
  const int64_t m = blockIdx.x;
  const int64_t slot = row_slot_checked(row_slot, m, capacity);
  if (slot < 0) return;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * SHRINK_WARPS + threadIdx.x / 32;
  if (r >= row_rank_clamped(row_rank, m, max_rank)) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const T* x_row = x + m * x_s0;
  const T* a_row = a + slot * a_s0 + r * a_s1;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) acc = fmaf(to_float(x_row[k * x_s1]), to_float(a_row[k * a_s2]), acc);
  acc = warp_sum(acc);
  if (lane == 0) t[m * t_s0 + r * t_s1] = acc * row_scale[m];
}

template <typename T>
__global__ void __launch_bounds__(EXPAND_THREADS)
    multi_lora_expand_kernel(int64_t N, int64_t capacity, int64_t max_rank, const float* t, int64_t t_s0,
                             int64_t t_s1, const T* b, int64_t b_s0, int64_t b_s1, int64_t b_s2,
                             const int32_t* row_slot, const int32_t* row_rank, const int32_t* dora_slots,
                             const float* g, int64_t g_s0, int64_t g_s1, const float* bias, T* y, int64_t y_s0,
                             int64_t y_s1) {
  __shared__ float t_chunk[EXPAND_THREADS];
  const int64_t m = blockIdx.x;
  const int64_t slot = row_slot_checked(row_slot, m, capacity);
  if (slot < 0) return;  // uniform per block: rows without adapter keep the base output bit for bit
  const int64_t rank = row_rank_clamped(row_rank, m, max_rank);
  const int64_t n = static_cast<int64_t>(blockIdx.y) * EXPAND_THREADS + threadIdx.x;
  const T* b_row = b + slot * b_s0 + n * b_s1;  // dereferenced only when n < N
  float acc = 0.0f;
  for (int64_t r0 = 0; r0 < rank; r0 += EXPAND_THREADS) {
    const int64_t chunk = rank - r0 < EXPAND_THREADS ? rank - r0 : EXPAND_THREADS;
    __syncthreads();  // the previous chunk is consumed
    if (threadIdx.x < chunk) t_chunk[threadIdx.x] = t[m * t_s0 + (r0 + threadIdx.x) * t_s1];
    __syncthreads();
    if (n < N) {
      for (int64_t r = 0; r < chunk; ++r) acc = fmaf(t_chunk[r], to_float(b_row[(r0 + r) * b_s2]), acc);
    }
  }
  if (n >= N) return;
  const int64_t p_y = m * y_s0 + n * y_s1;
  float v = to_float(y[p_y]);
  if (dora_slots[slot] != 0) {
    // y holds x W0^T + bias (cuBLAS adds it): take the bias out, scale, put it back, as peft does.
    const float bn = bias != nullptr ? bias[n] : 0.0f;
    v = g[slot * g_s0 + n * g_s1] * (v - bn + acc) + bn;
  } else {
    v += acc;
  }
  y[p_y] = from_float<T>(v);
}

constexpr int SEGMENT_TILE = 16;  // output tile edge and rows per step of the segmented weight gradient

template <typename TU, typename TV>
__global__ void __launch_bounds__(SEGMENT_TILE* SEGMENT_TILE)
    multi_lora_segment_grad_kernel(int64_t M, int64_t P, int64_t Q, int64_t capacity, const TU* u, int64_t u_s0,
                                   int64_t u_s1, const TV* v, int64_t v_s0, int64_t v_s1, const int32_t* sorted_rows,
                                   const int32_t* slot_rows, bool has_dropout, Dropout drop, float* out,
                                   int64_t out_s0, int64_t out_s1, int64_t out_s2) {
  __shared__ float u_tile[SEGMENT_TILE][SEGMENT_TILE + 1];  // [row][p], padded against bank conflicts
  __shared__ float v_tile[SEGMENT_TILE][SEGMENT_TILE + 1];  // [row][q]
  __shared__ int64_t rows[SEGMENT_TILE];
  const int64_t slot = blockIdx.x;
  const int tx = threadIdx.x % SEGMENT_TILE, ty = threadIdx.x / SEGMENT_TILE;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * SEGMENT_TILE + ty;
  const int64_t q = static_cast<int64_t>(blockIdx.z) * SEGMENT_TILE + tx;
  // A corrupt segment is clamped to [0, M]: the block then reads only rows of this batch.
  int64_t start = slot_rows[2 * slot], end = slot_rows[2 * slot + 1];
  start = start < 0 ? 0 : (start > M ? M : start);
  end = end < start ? start : (end > M ? M : end);
  float acc = 0.0f;
  for (int64_t s0 = start; s0 < end; s0 += SEGMENT_TILE) {
    __syncthreads();  // the previous step's tiles are consumed
    if (threadIdx.x < SEGMENT_TILE) {
      const int64_t s = s0 + threadIdx.x;
      int64_t row = s < end ? static_cast<int64_t>(sorted_rows[s]) : -1;
      rows[threadIdx.x] = (row >= 0 && row < M) ? row : -1;
    }
    __syncthreads();
    // Thread (ty, tx) loads u[rows[ty], p-tile column tx] and v[rows[ty], q].
    const int64_t row = rows[ty];
    const int64_t pu = static_cast<int64_t>(blockIdx.y) * SEGMENT_TILE + tx;
    u_tile[ty][tx] = (row >= 0 && pu < P) ? to_float(u[row * u_s0 + pu * u_s1]) : 0.0f;
    float vv = (row >= 0 && q < Q) ? to_float(v[row * v_s0 + q * v_s1]) : 0.0f;
    if (has_dropout && row >= 0 && q < Q && !drop.keep(row, q)) vv = 0.0f;
    v_tile[ty][tx] = vv;
    __syncthreads();
    for (int j = 0; j < SEGMENT_TILE; ++j) acc = fmaf(u_tile[j][ty], v_tile[j][tx], acc);
  }
  if (p < P && q < Q) out[slot * out_s0 + p * out_s1 + q * out_s2] = has_dropout ? acc * drop.inv_keep : acc;
}

}  // namespace

void multi_lora_segment_grad(int u_dtype, int v_dtype, int64_t M, int64_t P, int64_t Q, int64_t capacity,
                             uintptr_t u, int64_t u_s0, int64_t u_s1, uintptr_t v, int64_t v_s0, int64_t v_s1,
                             uintptr_t sorted_rows, uintptr_t slot_rows, uint32_t seed, double p, uintptr_t out,
                             int64_t out_s0, int64_t out_s1, int64_t out_s2, uintptr_t stream) {
  check_dtype(u_dtype, "multi_lora_segment_grad");
  check_dtype(v_dtype, "multi_lora_segment_grad");
  require(M >= 0 && P >= 0 && Q >= 0 && capacity >= 0, "multi_lora_segment_grad: negative size");
  require(p >= 0.0 && p < 1.0, "multi_lora_segment_grad: p must be in [0, 1)");
  require(cdiv(P, SEGMENT_TILE) <= 65535 && cdiv(Q, SEGMENT_TILE) <= 65535 && capacity <= 2147483647LL,
          "multi_lora_segment_grad: P, Q or capacity too large");
  if (capacity == 0 || P == 0 || Q == 0) return;
  const dim3 grid(static_cast<unsigned>(capacity), static_cast<unsigned>(cdiv(P, SEGMENT_TILE)),
                  static_cast<unsigned>(cdiv(Q, SEGMENT_TILE)));
  const bool has_dropout = p > 0.0;
  const Dropout drop = make_dropout(seed, has_dropout ? p : 0.0, Q);
  dispatch_dtype(u_dtype, [&](auto u_tag) {
    dispatch_dtype(v_dtype, [&](auto v_tag) {
      using TU = decltype(u_tag);
      using TV = decltype(v_tag);
      multi_lora_segment_grad_kernel<TU, TV><<<grid, SEGMENT_TILE * SEGMENT_TILE, 0, as_stream(stream)>>>(
          M, P, Q, capacity, reinterpret_cast<const TU*>(u), u_s0, u_s1, reinterpret_cast<const TV*>(v), v_s0, v_s1,
          reinterpret_cast<const int32_t*>(sorted_rows), reinterpret_cast<const int32_t*>(slot_rows), has_dropout,
          drop, reinterpret_cast<float*>(out), out_s0, out_s1, out_s2);
    });
  });
  check_launch("multi_lora_segment_grad_kernel");
}

void multi_lora_shrink(int dtype, int64_t M, int64_t K, int64_t capacity, int64_t max_rank, uintptr_t x,
                       int64_t x_s0, int64_t x_s1, uintptr_t a, int64_t a_s0, int64_t a_s1, int64_t a_s2,
                       uintptr_t row_slot, uintptr_t row_rank, uintptr_t row_scale, uintptr_t t, int64_t t_s0,
                       int64_t t_s1, uintptr_t stream) {
  require(M >= 0 && K >= 0 && capacity >= 0 && max_rank >= 0, "multi_lora_shrink: negative size");
  require(M <= 2147483647LL && cdiv(max_rank, SHRINK_WARPS) <= 65535, "multi_lora_shrink: M or max_rank too large");
  if (M == 0 || max_rank == 0 || capacity == 0) return;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(cdiv(max_rank, SHRINK_WARPS)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    multi_lora_shrink_kernel<T><<<grid, SHRINK_WARPS * 32, 0, as_stream(stream)>>>(
        K, capacity, max_rank, reinterpret_cast<const T*>(x), x_s0, x_s1, reinterpret_cast<const T*>(a), a_s0, a_s1,
        a_s2, reinterpret_cast<const int32_t*>(row_slot), reinterpret_cast<const int32_t*>(row_rank),
        reinterpret_cast<const float*>(row_scale), reinterpret_cast<float*>(t), t_s0, t_s1);
  });
  check_launch("multi_lora_shrink_kernel");
}

void multi_lora_expand(int dtype, int64_t M, int64_t N, int64_t capacity, int64_t max_rank, uintptr_t t,
                       int64_t t_s0, int64_t t_s1, uintptr_t b, int64_t b_s0, int64_t b_s1, int64_t b_s2,
                       uintptr_t row_slot, uintptr_t row_rank, uintptr_t dora_slots, uintptr_t g, int64_t g_s0,
                       int64_t g_s1, uintptr_t bias, uintptr_t y, int64_t y_s0, int64_t y_s1, uintptr_t stream) {
  require(M >= 0 && N >= 0 && capacity >= 0 && max_rank >= 0, "multi_lora_expand: negative size");
  require(M <= 2147483647LL && cdiv(N, EXPAND_THREADS) <= 65535, "multi_lora_expand: M or N too large");
  if (M == 0 || N == 0 || capacity == 0) return;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(cdiv(N, EXPAND_THREADS)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    multi_lora_expand_kernel<T><<<grid, EXPAND_THREADS, 0, as_stream(stream)>>>(
        N, capacity, max_rank, reinterpret_cast<const float*>(t), t_s0, t_s1, reinterpret_cast<const T*>(b), b_s0,
        b_s1, b_s2, reinterpret_cast<const int32_t*>(row_slot), reinterpret_cast<const int32_t*>(row_rank),
        reinterpret_cast<const int32_t*>(dora_slots), reinterpret_cast<const float*>(g), g_s0, g_s1,
        reinterpret_cast<const float*>(bias), reinterpret_cast<T*>(y), y_s0, y_s1);
  });
  check_launch("multi_lora_expand_kernel");
}

}  // namespace lowrank
