// CUDA kernels behind the ntl_fast operators: the checks, allocation and option plumbing are the
// shared ones of csrc/ntl_ops.h; this file fills the launch arguments and uses the current stream.
// The kernels themselves are in ntl_kernels.cu (torch-free). Built only when torch has CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ntl_ops.h"
#include "ntl_kernels.h"

namespace ntl {
namespace {

using at::Tensor;

int logits_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, "ntl_fast: unsupported logits dtype ", t.scalar_type());
  }
}

// The launch arguments every kernel reads: logits, labels, table and options.
CudaRows make_rows(const RowsCall& call, bool with_ce) {
  const Tensor& logits = call.logits;
  CudaRows a{};
  a.dtype = logits_dtype(logits);
  a.logits = logits.const_data_ptr();
  a.labels = call.labels.const_data_ptr();
  a.labels_int32 = call.labels.scalar_type() == at::kInt;
  a.M = logits.size(0);
  a.V = logits.size(1);
  a.K = call.K;
  a.number_ids = call.table.number_ids.const_data_ptr<int64_t>();
  a.number_values = call.table.number_values.const_data_ptr<float>();
  a.number_index = call.table.number_index.const_data_ptr<int64_t>();
  a.value_order = call.table.value_order.const_data_ptr<int64_t>();
  a.sorted_gaps = call.table.sorted_gaps.const_data_ptr<float>();
  a.with_ce = with_ce;
  a.options = call.options;
  return a;
}

// The number-token workspace of the backward and one-pass kernels, on the logits' device (the
// caching allocator's blocks are aligned far beyond the 8 bytes the kernels need).
Tensor new_workspace(const Tensor& logits, CudaRows& a) {
  a.workspace_size = workspace_bytes(a.dtype, a.M, a.K);
  Tensor workspace = at::empty({static_cast<int64_t>(a.workspace_size)}, logits.options().dtype(at::kByte));
  a.workspace = workspace.data_ptr();
  return workspace;
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "ntl_fast: ", what, " kernel launch failed: ", cudaGetErrorString(status));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  static void check(const RowsCall& call) {
    TORCH_CHECK(call.logits.is_cuda(), "ntl_fast: CUDA kernel called with ", call.logits.device(), " tensors");
    TORCH_CHECK(call.K <= kMaxNumberTokens, "ntl_fast: the CUDA kernels serve at most ", kMaxNumberTokens,
                " number tokens, the table has ", call.K);
    TORCH_CHECK(call.logits.size(0) <= 0x7fffffffLL, "ntl_fast: the CUDA kernels serve at most 2^31 - 1 rows");
  }

  static void forward(const RowsCall& call, bool with_ce, const Tensor& ce, const Tensor& ntl,
                      const Tensor& row_stats) {
    CudaRows a = make_rows(call, with_ce);
    a.ce = with_ce ? ce.data_ptr() : nullptr;
    a.ntl = ntl.data_ptr();
    a.row_stats = row_stats.data_ptr();
    check_launch(launch_forward(a, current_stream()), "forward");
  }

  static void backward(const RowsCall& call, const Tensor& row_stats, const Tensor& grad_ce, const Tensor& grad_ntl,
                       const Tensor& out) {
    const bool with_ce = grad_ce.defined();
    CudaRows a = make_rows(call, with_ce);
    a.grad_logits = out.data_ptr();
    a.row_stats = const_cast<void*>(row_stats.const_data_ptr());
    a.grad_ce = with_ce ? grad_ce.const_data_ptr() : nullptr;
    a.grad_ntl = grad_ntl.const_data_ptr();
    const Tensor workspace = new_workspace(call.logits, a);
    check_launch(launch_backward(a, current_stream()), "backward");
  }

  static void loss_and_grad(const RowsCall& call, const Tensor& ce_scale, const Tensor& ntl_scale, const Tensor& ce,
                            const Tensor& ntl, const Tensor& grad) {
    CudaRows a = make_rows(call, true);
    a.ce = ce.data_ptr();
    a.ntl = ntl.data_ptr();
    a.grad_logits = grad.data_ptr();
    a.ce_scale = ce_scale.const_data_ptr();
    a.ntl_scale = ntl_scale.const_data_ptr();
    const Tensor workspace = new_workspace(call.logits, a);
    check_launch(launch_loss_and_grad(a, current_stream()), "loss and gradient");
  }

  static Tensor new_gradient(const Tensor& logits) { return at::empty_like(logits); }

  // grad_output stays on the device: no host sync, and capturable in a CUDA graph.
  static void scale_gradient(const Tensor& grad, const Tensor& grad_output) {
    check_launch(launch_scale_gradient(grad.data_ptr(), logits_dtype(grad), grad.numel(),
                                       grad_output.const_data_ptr(), current_stream()),
                 "gradient scale");
  }
};

}  // namespace
}  // namespace ntl

TORCH_LIBRARY_IMPL(ntl_fast, CUDA, m) { ntl::Operators<ntl::CudaKernels>::register_all(m); }
