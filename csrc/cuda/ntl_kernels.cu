// CUDA kernels of the ntl_fast operators: one thread block per row of logits.
//
// Forward: the block computes LSE_V (or, for reweighed rows, the LSE of the text tokens) with an
// online max + sum (one read of the row), then thread 0 scores the K number tokens with the shared
// math of ntl_math.h. Backward: thread 0 computes the gradient of the number columns and of the
// label column into shared memory (reading the logits it needs first), the block writes
// coef * p_k over the row (one read, one write per element), then thread 0 writes the fixed
// columns in order, so that a table with a repeated id still gives one deterministic result.
// Reading before writing lets the backward run in place. The kernels read the table as given
// (the host never reads device memory to check it) and stay in bounds and deterministic
// whatever it holds.
//
// Torch-free: only the CUDA runtime and its bf16/fp16 headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../ntl_math.h"
#include "ntl_kernels.h"

namespace ntl {
namespace {

NTL_HD float load_acc(float x) { return x; }
NTL_HD double load_acc(double x) { return x; }
NTL_HD float load_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
NTL_HD float load_acc(__half x) { return __half2float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half store_as<__half>(float x) { return __float2half(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t store_as(double x) { return x; }

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// One row's number-token logits, read from global memory (bounds-checked ids).
template <typename scalar_t, typename acc_t>
struct GlobalRow {
  const scalar_t* z;
  const int64_t* ids;
  const float* values;
  const int64_t* order;
  const float* gaps;
  int64_t V, K;

  NTL_HD acc_t logit(int64_t k) const {
    const int64_t id = ids[k];
    return (id >= 0 && id < V) ? acc_t(load_acc(z[id])) : acc_t(NAN);
  }
  NTL_HD float value(int64_t k) const { return values[k]; }
  NTL_HD int64_t sorted(int64_t i) const {
    const int64_t o = order[i];
    return (o >= 0 && o < K) ? o : -1;
  }
  NTL_HD float gap(int64_t i) const { return gaps[i]; }
};

__device__ __forceinline__ int64_t read_label(const CudaRows& a, int64_t r) {
  return a.labels_int32 ? int64_t(static_cast<const int32_t*>(a.labels)[r])
                        : static_cast<const int64_t*>(a.labels)[r];
}

// Merge two (max, sum of exp(x - max)) pairs.
template <typename acc_t>
__device__ __forceinline__ void merge_lse(acc_t& m, acc_t& s, acc_t other_m, acc_t other_s) {
  const acc_t next = fmax(m, other_m);
  if (next == acc_t(-INFINITY)) return;
  s = s * ntl_exp(m - next) + other_s * ntl_exp(other_m - next);
  m = next;
}

constexpr int kUnroll = 4;

// The LSE of the row (text_only: of its columns off N, by number_index), returned to every thread
// of the block. NaN logits give NaN.
template <typename scalar_t, typename acc_t>
__device__ LogSumExp<acc_t> block_logsumexp(const scalar_t* z, int64_t V, bool text_only,
                                            const int64_t* number_index) {
  __shared__ acc_t warp_m[32], warp_s[32];
  __shared__ LogSumExp<acc_t> result;
  acc_t m = -INFINITY, s = 0;
  bool nan = false;  // a lane whose elements are all NaN never updates (m, s): flag it apart
  const int64_t stride = int64_t(blockDim.x) * kUnroll;
  for (int64_t base = threadIdx.x; base < V; base += stride) {
    acc_t x[kUnroll];
    acc_t block_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + int64_t(j) * blockDim.x;
      const bool counted = i < V && !(text_only && number_index[i] >= 0);
      x[j] = counted ? acc_t(load_acc(z[i])) : acc_t(-INFINITY);
      nan |= x[j] != x[j];
      block_max = fmax(block_max, x[j]);
    }
    const acc_t next = fmax(m, block_max);
    if (next == acc_t(-INFINITY)) continue;
    acc_t sum = s * ntl_exp(m - next);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) sum += ntl_exp(x[j] - next);
    s = sum;
    m = next;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t om = __shfl_xor_sync(0xffffffffu, m, offset);
    const acc_t os = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_lse(m, s, om, os);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  const bool any_nan = __syncthreads_or(nan);
  if (warp == 0) {
    m = lane < warps ? warp_m[lane] : acc_t(-INFINITY);
    s = lane < warps ? warp_s[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc_t om = __shfl_xor_sync(0xffffffffu, m, offset);
      const acc_t os = __shfl_xor_sync(0xffffffffu, s, offset);
      merge_lse(m, s, om, os);
    }
    if (lane == 0) result = lse_finish(m, s, any_nan);
  }
  __syncthreads();
  return result;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ GlobalRow<scalar_t, acc_t> global_row(const CudaRows& a, const scalar_t* z) {
  return GlobalRow<scalar_t, acc_t>{z, a.number_ids, a.number_values, a.value_order, a.sorted_gaps, a.V, a.K};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const CudaRows a) {
  const int64_t r = blockIdx.x;
  const scalar_t* z = static_cast<const scalar_t*>(a.logits) + r * a.V;
  __shared__ RowLabel lab;
  __shared__ int dense_kind;
  if (threadIdx.x == 0) {
    lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
    dense_kind = dense_lse_kind(lab, a.with_ce, a.options);
  }
  __syncthreads();
  LogSumExp<acc_t> dense{0, 0};
  if (dense_kind != kNoDense)
    dense = block_logsumexp<scalar_t, acc_t>(z, a.V, dense_kind == kDenseText, a.number_index);
  if (threadIdx.x != 0) return;
  const GlobalRow<scalar_t, acc_t> row = global_row<scalar_t, acc_t>(a, z);
  const RowStats<acc_t> stats = row_stats(row, lab, dense_kind, dense);
  const acc_t z_label = lab.in_range ? acc_t(load_acc(z[lab.label])) : acc_t(0);
  acc_t ce = 0, ntl = 0;
  row_forward(row, lab, z_label, stats, a.with_ce, a.options, &ce, &ntl);
  if (a.with_ce) static_cast<acc_t*>(a.ce)[r] = ce;
  static_cast<acc_t*>(a.ntl)[r] = ntl;
  stats.store(static_cast<acc_t*>(a.row_stats) + r * RowStats<acc_t>::kSize);
}

extern __shared__ __align__(16) unsigned char ntl_dynamic_smem[];

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const CudaRows a) {
  const int64_t r = blockIdx.x;
  const scalar_t* z = static_cast<const scalar_t*>(a.logits) + r * a.V;
  scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + r * a.V;
  acc_t* fix = reinterpret_cast<acc_t*>(ntl_dynamic_smem);
  __shared__ RowGradient<acc_t> g;
  const RowStats<acc_t> stats =
      RowStats<acc_t>::load(static_cast<const acc_t*>(a.row_stats) + r * RowStats<acc_t>::kSize);
  if (threadIdx.x == 0) {
    const RowLabel lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
    const GlobalRow<scalar_t, acc_t> row = global_row<scalar_t, acc_t>(a, z);
    const acc_t z_label = lab.in_range ? acc_t(load_acc(z[lab.label])) : acc_t(0);
    const acc_t grad_ce = a.with_ce ? static_cast<const acc_t*>(a.grad_ce)[r] : acc_t(0);
    const acc_t grad_ntl = static_cast<const acc_t*>(a.grad_ntl)[r];
    g = row_backward(row, lab, z_label, stats, grad_ce, grad_ntl, a.with_ce, a.options, fix);
  }
  __syncthreads();
  const acc_t coef = g.coef;
  if (coef != acc_t(0)) {
    // coef * exp(z - LSE_V) as (coef / Σ) * exp(z - max): shift-invariant, one exp per element.
    const acc_t scale = coef * ntl_exp(-stats.vocab.log_sum), mx = stats.vocab.max;
    for (int64_t i = threadIdx.x; i < a.V; i += blockDim.x)
      out[i] = store_as<scalar_t>(scale * ntl_exp(acc_t(load_acc(z[i])) - mx));
  } else {
    for (int64_t i = threadIdx.x; i < a.V; i += blockDim.x) out[i] = store_as<scalar_t>(acc_t(0));
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // One thread, in the order of the CPU kernels: a repeated id (or a label column that is also a
  // number id, in a corrupt table) is written last-wins, never raced.
  if (g.number_fix) {
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t id = a.number_ids[k];
      if (id >= 0 && id < a.V) out[id] = store_as<scalar_t>(fix[k]);
    }
  }
  if (g.label_column >= 0) out[g.label_column] = store_as<scalar_t>(g.label_fix);
}

int threads_for(int64_t V) { return V >= 8192 ? 512 : (V >= 1024 ? 256 : 128); }

template <typename scalar_t>
cudaError_t launch(const CudaRows& a, cudaStream_t stream, bool backward) {
  using acc_t = typename AccType<scalar_t>::type;
  if (a.M == 0) return cudaSuccess;
  if (a.M > 0x7fffffffLL || a.K > kMaxNumberTokens) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(a.M));
  if (backward) {
    backward_kernel<scalar_t, acc_t><<<grid, threads_for(a.V), a.K * sizeof(acc_t), stream>>>(a);
  } else {
    forward_kernel<scalar_t, acc_t><<<grid, threads_for(a.V), 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t dispatch(const CudaRows& a, cudaStream_t stream, bool backward) {
  switch (a.dtype) {
    case kFloat32: return launch<float>(a, stream, backward);
    case kBFloat16: return launch<__nv_bfloat16>(a, stream, backward);
    case kFloat16: return launch<__half>(a, stream, backward);
    case kFloat64: return launch<double>(a, stream, backward);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_forward(const CudaRows& rows, cudaStream_t stream) { return dispatch(rows, stream, false); }

cudaError_t launch_backward(const CudaRows& rows, cudaStream_t stream) { return dispatch(rows, stream, true); }

}  // namespace ntl
