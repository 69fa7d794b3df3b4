// C launch API of the ntl_fast CUDA kernels (csrc/cuda/ntl_kernels.cu).
//
// Torch-free: the kernels compile with nvcc alone in seconds, and csrc/cuda/ntl_cuda.cpp does
// the tensor plumbing (checks, allocation, the current stream) and calls these functions.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../ntl_math.h"

namespace ntl {

enum LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// One call's buffers. Row arrays (ce, ntl, row_stats, grad_*) are float64 for float64 logits and
// float32 otherwise; all tensors are contiguous and on the same device.
struct CudaRows {
  int dtype;                  // LogitsDtype of logits / grad_logits
  const void* logits;         // (M, V)
  void* grad_logits;          // (M, V), may equal logits (in-place backward)
  const void* labels;         // (M,)
  bool labels_int32;          // else int64
  int64_t M, V, K;
  const int64_t* number_ids;  // (K,)
  const float* number_values; // (K,)
  const int64_t* number_index;// (V,)
  const int64_t* value_order; // (K,)
  const float* sorted_gaps;   // (K-1,)
  bool with_ce;
  void* ce;                   // forward outputs, (M,); ce unused when !with_ce
  void* ntl;
  void* row_stats;            // (M, RowStats::kSize): forward output, backward input
  const void* grad_ce;        // backward inputs, (M,); grad_ce unused when !with_ce
  const void* grad_ntl;
  const void* ce_scale;       // one-pass inputs, (M,): d total / d ce_r and d total / d ntl_r
  const void* ntl_scale;
  void* workspace;            // backward and one-pass: room for at least one row, 8-byte aligned
  size_t workspace_size;      // its bytes: workspace_bytes(dtype, M, K), or less (more chunks)
  Options options;
};

// The largest K the kernels serve (the backward keeps K fixes per row in shared memory).
constexpr int64_t kMaxNumberTokens = 4096;  // 32 KiB of float64 fixes, under the 48 KiB default

// The number-token workspace launch_backward and launch_loss_and_grad need (their number-token
// math runs in a kernel of its own and hands each row's coefficients to the dense pass through it):
// at most 64 MiB whatever M is. The rows go through it in chunks of as many rows as it holds, so
// a smaller one (down to workspace_bytes(dtype, 1, K)) also works.
size_t workspace_bytes(int dtype, int64_t M, int64_t K);

cudaError_t launch_forward(const CudaRows& rows, cudaStream_t stream);
cudaError_t launch_backward(const CudaRows& rows, cudaStream_t stream);
// Loss and gradient in one pass (reductions "mean" and "sum"): writes ce, ntl and
// grad_logits = d(sum_r ce_scale[r] ce_r + ntl_scale[r] ntl_r) / d logits, each row's gradient
// while the row is still in cache; grad_logits may equal logits (in place). with_ce must be true.
cudaError_t launch_loss_and_grad(const CudaRows& rows, cudaStream_t stream);
//
// How launch_loss_and_grad runs on the current device (plan_loss_and_grad says it without
// launching anything). A row that fits in a block's opt-in shared memory
// (cudaDevAttrMaxSharedMemoryPerBlockOptin, less the K fixes and 2 KiB) is staged there by the
// sweep that computes its log-sum-exp, and the gradient is formed from shared memory: the logits
// are read from DRAM once by construction (bfloat16 up to about 115,000 columns, float32 up to
// about 57,000 on an H100). A wider row is read twice from global memory; the grid is then
// persistent (each block loops over rows) and bounded so that the rows in flight, each with its
// gradient unless in place, fill at most half of L2 (cudaDevAttrL2CacheSize): the second read
// hits L2. Two environment variables override the plan, for measuring one against the other:
//   NTL_FAST_CUDA_ROW_IN_SMEM=0       never stage rows in shared memory;
//   NTL_FAST_CUDA_ROWS_IN_FLIGHT=N    N blocks (N > 0) looping over the rows, staged or not; 0:
//                                     one block per row (unbounded).
struct OnePassPlan {
  bool staged;     // the row is staged in shared memory (one DRAM read)
  size_t smem;     // dynamic shared memory per block, bytes
  int64_t blocks;  // blocks of the grid (rows in flight) per chunk of rows; 0: one block per row
};
cudaError_t plan_loss_and_grad(const CudaRows& rows, OnePassPlan* plan);
// grad (numel elements of LogitsDtype dtype) *= *grad_output in place, the scalar read on the
// device (float64 for kFloat64, float32 otherwise); every block returns at once when it is 1.
cudaError_t launch_scale_gradient(void* grad, int dtype, int64_t numel, const void* grad_output,
                                  cudaStream_t stream);

}  // namespace ntl
