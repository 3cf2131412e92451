// The one low-rank building block: a strided, tiled GEMM with fp32 accumulation and a small epilogue.
//
//   acc[m, n] = sum_k a(m, k) * k_scale[k] * b(k, n)          a(m, k) = A[m * a_s0 + k * a_s1], b likewise
//   v  = alpha * acc            (* 1 / (1 - p) when the dropout mask zeroed entries of A or B)
//   v *= row_scale[m] * col_scale[n]
//   v  = kept(m, n) ? v / (1 - p) : 0                         mask on C (LoRA's dx: drop' of the low-rank term)
//   v += beta * cin[m, n]                                      (read only when beta != 0; cin may alias C)
//   v *= post_scale[n]; v += bias[n]                           (DoRA's g and bias)
//   C[m, n] = round(v)
//
// Every optional vector is float32 (the Python wrappers convert). Transposes are strides, so one kernel serves the
// LoRA shrink and expand, every backward product and DoRA's factored norm. The mask of x hides in A (shrink), in B
// (dA = t^T drop(x)) or in C (dx), at that operand's (first, second) index, hashed as row * mask_cols + col.
//
// Tiles: 64 x 64 outputs per 256-thread block, 4 x 4 per thread, K in steps of 16 through shared memory (fp32).
// Correctness over speed: every load is bounds-checked, offsets are int64, and the layout needs no alignment.
#include "common.cuh"

namespace lowrank {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int THREADS = (BM / TM) * (BN / TN);  // 256
static_assert((BM * BK) % THREADS == 0 && (BK * BN) % THREADS == 0, "tile loads must split evenly");

struct GemmArgs {
  int64_t M, N, K;
  const void* a;
  int64_t a_s0, a_s1;
  const void* b;
  int64_t b_s0, b_s1;
  void* c;
  int64_t c_s0, c_s1;
  const void* cin;
  int64_t cin_s0, cin_s1;
  float alpha, beta;
  const float* k_scale;
  const float* row_scale;
  const float* col_scale;
  const float* post_scale;
  const float* bias;
  int mask_on;
  Dropout drop;
};

template <typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(THREADS) gemm_kernel(const GemmArgs g) {
  // +1 column: the tile stores walk the fast index of either layout without piling onto one bank.
  __shared__ float a_tile[BK][BM + 1];
  __shared__ float b_tile[BK][BN + 1];

  const TA* __restrict__ A = static_cast<const TA*>(g.a);
  const TB* __restrict__ B = static_cast<const TB*>(g.b);
  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN);  // this thread's output columns: tx * TN + [0, TN)
  const int ty = tid / (BN / TN);  // its output rows: ty * TM + [0, TM)
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  // Consecutive threads load along whichever index is contiguous in memory (coalesced); any stride is correct.
  const bool a_k_fast = g.a_s1 == 1;
  const bool b_n_fast = g.b_s1 == 1;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < g.K; k0 += BK) {
#pragma unroll
    for (int l = 0; l < (BM * BK) / THREADS; ++l) {
      const int e = tid + l * THREADS;  // [0, BM * BK)
      const int mm = a_k_fast ? e / BK : e % BM;
      const int kk = a_k_fast ? e % BK : e / BM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      float v = 0.0f;
      if (gm < g.M && gk < g.K) {
        v = to_float(A[gm * g.a_s0 + gk * g.a_s1]);
        if (g.mask_on == kMaskA && !g.drop.keep(gm, gk)) v = 0.0f;
        if (g.k_scale != nullptr) v *= g.k_scale[gk];
      }
      a_tile[kk][mm] = v;
    }
#pragma unroll
    for (int l = 0; l < (BK * BN) / THREADS; ++l) {
      const int e = tid + l * THREADS;  // [0, BK * BN)
      const int nn = b_n_fast ? e % BN : e / BK;
      const int kk = b_n_fast ? e / BN : e % BK;
      const int64_t gk = k0 + kk, gn = n0 + nn;
      float v = 0.0f;
      if (gk < g.K && gn < g.N) {
        v = to_float(B[gk * g.b_s0 + gn * g.b_s1]);
        if (g.mask_on == kMaskB && !g.drop.keep(gk, gn)) v = 0.0f;
      }
      b_tile[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a_frag[TM], b_frag[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a_frag[i] = a_tile[kk][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b_frag[j] = b_tile[kk][tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();
  }

  TC* __restrict__ C = static_cast<TC*>(g.c);
  const TC* Cin = static_cast<const TC*>(g.cin);  // may alias C: each element is read, then written, by one thread
  const bool operand_mask = g.mask_on == kMaskA || g.mask_on == kMaskB;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + ty * TM + i;
    if (gm >= g.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tx * TN + j;
      if (gn >= g.N) continue;
      float v = g.alpha * acc[i][j];
      if (operand_mask) v *= g.drop.inv_keep;
      if (g.row_scale != nullptr) v *= g.row_scale[gm];
      if (g.col_scale != nullptr) v *= g.col_scale[gn];
      if (g.mask_on == kMaskC) v = g.drop.keep(gm, gn) ? v * g.drop.inv_keep : 0.0f;
      if (g.beta != 0.0f) v += g.beta * to_float(Cin[gm * g.cin_s0 + gn * g.cin_s1]);
      if (g.post_scale != nullptr) v *= g.post_scale[gn];
      if (g.bias != nullptr) v += g.bias[gn];
      C[gm * g.c_s0 + gn * g.c_s1] = from_float<TC>(v);
    }
  }
}

template <typename TA, typename TB, typename TC>
void launch_gemm(const GemmArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(args.M, BM)), static_cast<unsigned>(cdiv(args.N, BN)));
  gemm_kernel<TA, TB, TC><<<grid, THREADS, 0, stream>>>(args);
  check_launch("gemm_kernel");
}

using Launcher = void (*)(const GemmArgs&, cudaStream_t);

// The operand-type patterns the primitives use (ops/*/cuda.py); a wider table would only multiply compile time.
template <typename T>
Launcher launcher_for(bool a32, bool b32, bool c32) {
  if (!a32 && !b32 && c32) return launch_gemm<T, T, float>;      // shrink, W0 A^T, A A^T
  if (a32 && !b32 && !c32) return launch_gemm<float, T, T>;      // the low-rank epilogue: expand, dx
  if (a32 && !b32 && c32) return launch_gemm<float, T, float>;   // weight gradients t^T drop(x), xa^T dy
  if (!a32 && b32 && c32) return launch_gemm<T, float, float>;   // DoRA's B G
  return nullptr;
}

// The kernel for these operand dtypes, or invalid_argument: decided before any size check returns early, so a bad
// pattern fails on a machine without a GPU too (tests call the bindings with size 0).
Launcher select_launcher(int a_dtype, int b_dtype, int c_dtype) {
  int t = kFloat32;  // the one 16-bit type among the operands (float32 when there is none)
  for (int d : {a_dtype, b_dtype, c_dtype}) {
    require(d == kFloat32 || d == kFloat16 || d == kBFloat16, std::string("gemm: bad dtype code ") + std::to_string(d));
    if (d == kFloat32) continue;
    require(t == kFloat32 || t == d, std::string("gemm: operands mix ") + dtype_name(t) + " and " + dtype_name(d));
    t = d;
  }
  const bool a32 = a_dtype == kFloat32, b32 = b_dtype == kFloat32, c32 = c_dtype == kFloat32;
  Launcher launcher = launch_gemm<float, float, float>;
  if (t == kFloat16) launcher = launcher_for<__half>(a32, b32, c32);
  if (t == kBFloat16) launcher = launcher_for<__nv_bfloat16>(a32, b32, c32);
  require(launcher != nullptr, std::string("gemm: unsupported operand dtypes (a, b, c) = (") + dtype_name(a_dtype) +
                                   ", " + dtype_name(b_dtype) + ", " + dtype_name(c_dtype) + ")");
  return launcher;
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, uintptr_t a, int a_dtype, int64_t a_s0, int64_t a_s1, uintptr_t b,
          int b_dtype, int64_t b_s0, int64_t b_s1, uintptr_t c, int c_dtype, int64_t c_s0, int64_t c_s1,
          double alpha, uintptr_t cin, int64_t cin_s0, int64_t cin_s1, double beta, uintptr_t k_scale,
          uintptr_t row_scale, uintptr_t col_scale, uintptr_t post_scale, uintptr_t bias, int mask_on,
          uint32_t seed, double p, int64_t mask_cols, uintptr_t stream) {
  require(M >= 0 && N >= 0 && K >= 0, "gemm: negative size");
  require(mask_on >= kMaskNone && mask_on <= kMaskC, "gemm: mask_on must be 0 (none), 1 (A), 2 (B) or 3 (C)");
  require(mask_on == kMaskNone || (p >= 0.0 && p < 1.0 && mask_cols > 0), "gemm: dropout needs 0 <= p < 1, cols > 0");
  require(beta == 0.0 || cin != 0, "gemm: beta != 0 needs cin");
  require(cdiv(N, BN) <= 65535, "gemm: N too large for the grid (N <= 4194240)");
  require(cdiv(M, BM) <= 2147483647LL, "gemm: M too large for the grid");
  const Launcher launch = select_launcher(a_dtype, b_dtype, c_dtype);
  if (M == 0 || N == 0) return;
  require(c != 0 && (K == 0 || (a != 0 && b != 0)), "gemm: null operand");

  GemmArgs args;
  args.M = M, args.N = N, args.K = K;
  args.a = reinterpret_cast<const void*>(a), args.a_s0 = a_s0, args.a_s1 = a_s1;
  args.b = reinterpret_cast<const void*>(b), args.b_s0 = b_s0, args.b_s1 = b_s1;
  args.c = reinterpret_cast<void*>(c), args.c_s0 = c_s0, args.c_s1 = c_s1;
  args.cin = reinterpret_cast<const void*>(cin), args.cin_s0 = cin_s0, args.cin_s1 = cin_s1;
  args.alpha = static_cast<float>(alpha), args.beta = static_cast<float>(beta);
  args.k_scale = reinterpret_cast<const float*>(k_scale);
  args.row_scale = reinterpret_cast<const float*>(row_scale);
  args.col_scale = reinterpret_cast<const float*>(col_scale);
  args.post_scale = reinterpret_cast<const float*>(post_scale);
  args.bias = reinterpret_cast<const float*>(bias);
  args.mask_on = mask_on;
  args.drop = make_dropout(seed, mask_on == kMaskNone ? 0.0 : p, mask_on == kMaskNone ? 1 : mask_cols);
  launch(args, as_stream(stream));
}

}  // namespace lowrank
