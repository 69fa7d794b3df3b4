// CUDA implementations of the ntl_fast operators: checks, allocation and the current stream; the
// kernels themselves are in ntl_kernels.cu (torch-free). Built only when torch has CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ntl_checks.h"
#include "ntl_kernels.h"

namespace ntl {
namespace {

using at::Tensor;

int logits_dtype(const Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, "ntl_fast: unsupported logits dtype ", logits.scalar_type());
  }
}

CudaRows make_rows(const Tensor& logits, const Tensor& labels, const TableTensors& table, const Options& opt,
                   bool with_ce) {
  const int64_t K = check_inputs(logits, labels, table);
  TORCH_CHECK(logits.is_cuda(), "ntl_fast: CUDA kernel called with ", logits.device(), " tensors");
  TORCH_CHECK(K <= kMaxNumberTokens, "ntl_fast: the CUDA kernels serve at most ", kMaxNumberTokens,
              " number tokens, the table has ", K);
  TORCH_CHECK(logits.size(0) <= 0x7fffffffLL, "ntl_fast: the CUDA kernels serve at most 2^31 - 1 rows");
  CudaRows a{};
  a.dtype = logits_dtype(logits);
  a.logits = logits.const_data_ptr();
  a.labels = labels.const_data_ptr();
  a.labels_int32 = labels.scalar_type() == at::kInt;
  a.M = logits.size(0);
  a.V = logits.size(1);
  a.K = K;
  a.number_ids = table.number_ids.const_data_ptr<int64_t>();
  a.number_values = table.number_values.const_data_ptr<float>();
  a.number_index = table.number_index.const_data_ptr<int64_t>();
  a.value_order = table.value_order.const_data_ptr<int64_t>();
  a.sorted_gaps = table.sorted_gaps.const_data_ptr<float>();
  a.with_ce = with_ce;
  a.options = opt;
  return a;
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "ntl_fast: ", what, " kernel launch failed: ", cudaGetErrorString(status));
}

// Returns (ce, ntl, row_stats); ce is empty when !with_ce.
std::tuple<Tensor, Tensor, Tensor> forward_cuda(const Tensor& logits, const Tensor& labels_in,
                                                const TableTensors& table, const Options& opt, bool with_ce) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor labels = labels_in.contiguous();
  CudaRows a = make_rows(logits, labels, table, opt, with_ce);
  auto options = logits.options().dtype(accumulation_type(logits));
  Tensor ce = at::zeros({with_ce ? a.M : 0}, options);
  Tensor ntl = at::empty({a.M}, options);
  Tensor row_stats = at::empty({a.M, RowStats<float>::kSize}, options);
  a.ce = with_ce ? ce.data_ptr() : nullptr;
  a.ntl = ntl.data_ptr();
  a.row_stats = row_stats.data_ptr();
  check_launch(launch_forward(a, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {ce, ntl, row_stats};
}

Tensor as_row_gradient(const Tensor& grad, const char* name, const Tensor& logits) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), "ntl_fast: ", name, " must have shape (",
              logits.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(grad.is_floating_point(), "ntl_fast: ", name, " must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), "ntl_fast: ", name, " is on ", grad.device(), " but logits on ",
              logits.device());
  return grad.to(accumulation_type(logits)).contiguous();
}

void backward_cuda(const Tensor& out, const Tensor& grad_ce_in, const Tensor& grad_ntl_in, const Tensor& logits,
                   const Tensor& labels_in, const Tensor& row_stats, const TableTensors& table,
                   const Options& opt) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool with_ce = grad_ce_in.defined();
  const Tensor labels = labels_in.contiguous();
  CudaRows a = make_rows(logits, labels, table, opt, with_ce);
  check_row_stats(row_stats, logits);
  const Tensor grad_ce = with_ce ? as_row_gradient(grad_ce_in, "grad_ce", logits) : Tensor();
  const Tensor grad_ntl = as_row_gradient(grad_ntl_in, "grad_ntl", logits);
  a.grad_logits = out.data_ptr();
  a.row_stats = const_cast<void*>(row_stats.const_data_ptr());
  a.grad_ce = with_ce ? grad_ce.const_data_ptr() : nullptr;
  a.grad_ntl = grad_ntl.const_data_ptr();
  check_launch(launch_backward(a, c10::cuda::getCurrentCUDAStream().stream()), "backward");
}

// The out-of-place backward of either operation (grad_ce undefined: NTL alone) into a new tensor.
Tensor fresh_gradient(const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels,
                      const Tensor& row_stats, const TableTensors& table, const Options& opt) {
  check_inputs(logits, labels, table);
  Tensor out = at::empty_like(logits);
  backward_cuda(out, grad_ce, grad_ntl, logits, labels, row_stats, table, opt);
  return out;
}

std::tuple<Tensor, Tensor> ntl_forward(const Tensor& logits, const Tensor& labels, const Tensor& number_ids,
                                       const Tensor& number_values, const Tensor& number_index,
                                       const Tensor& value_order, const Tensor& sorted_gaps, c10::string_view loss,
                                       std::optional<double> squash_factor, double min_distance,
                                       double max_distance, bool reweigh, double reweigh_constant,
                                       std::optional<double> gaussian_sigma, int64_t ignore_index) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  auto [ce, ntl, row_stats] = forward_cuda(
      logits, labels, {number_ids, number_values, number_index, value_order, sorted_gaps}, opt, false);
  return {ntl, row_stats};
}

std::tuple<Tensor, Tensor, Tensor> ce_ntl_forward(
    const Tensor& logits, const Tensor& labels, const Tensor& number_ids, const Tensor& number_values,
    const Tensor& number_index, const Tensor& value_order, const Tensor& sorted_gaps, c10::string_view loss,
    std::optional<double> squash_factor, double min_distance, double max_distance, bool reweigh,
    double reweigh_constant, std::optional<double> gaussian_sigma, int64_t ignore_index, bool /*inplace_backward*/) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return forward_cuda(logits, labels, {number_ids, number_values, number_index, value_order, sorted_gaps}, opt,
                      true);
}

Tensor ntl_backward(const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels, const Tensor& row_stats,
                    const Tensor& number_ids, const Tensor& number_values, const Tensor& number_index,
                    const Tensor& value_order, const Tensor& sorted_gaps, c10::string_view loss,
                    std::optional<double> squash_factor, double min_distance, double max_distance, bool reweigh,
                    double reweigh_constant, std::optional<double> gaussian_sigma, int64_t ignore_index) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return fresh_gradient(Tensor(), grad_ntl, logits, labels, row_stats,
                        {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

Tensor ce_ntl_backward(const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels,
                       const Tensor& row_stats, const Tensor& number_ids, const Tensor& number_values,
                       const Tensor& number_index, const Tensor& value_order, const Tensor& sorted_gaps,
                       c10::string_view loss, std::optional<double> squash_factor, double min_distance,
                       double max_distance, bool reweigh, double reweigh_constant,
                       std::optional<double> gaussian_sigma, int64_t ignore_index) {
  TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return fresh_gradient(grad_ce, grad_ntl, logits, labels, row_stats,
                        {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

void ce_ntl_backward_(const Tensor& logits, const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& labels,
                      const Tensor& row_stats, const Tensor& number_ids, const Tensor& number_values,
                      const Tensor& number_index, const Tensor& value_order, const Tensor& sorted_gaps,
                      c10::string_view loss, std::optional<double> squash_factor, double min_distance,
                      double max_distance, bool reweigh, double reweigh_constant,
                      std::optional<double> gaussian_sigma, int64_t ignore_index) {
  TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  backward_cuda(logits, grad_ce, grad_ntl, logits, labels, row_stats,
                {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

}  // namespace
}  // namespace ntl

TORCH_LIBRARY_IMPL(ntl_fast, CUDA, m) {
  m.impl("ntl_forward", &ntl::ntl_forward);
  m.impl("ce_ntl_forward", &ntl::ce_ntl_forward);
  m.impl("ntl_backward", &ntl::ntl_backward);
  m.impl("ce_ntl_backward", &ntl::ce_ntl_backward);
  m.impl("ce_ntl_backward_", &ntl::ce_ntl_backward_);
}
