// The host side of every ntl_fast operator (schemas: csrc/ntl_fast.cpp), written once for all
// backends: check the arguments, build the Options and the table from the op arguments, allocate
// the outputs, then call the backend's kernels. A backend file defines a Kernels struct and
// registers `Operators<Kernels>::register_all(m)` in its TORCH_LIBRARY_IMPL block.
//
// What a Kernels struct provides (all outputs are allocated and every argument checked before):
//   using Guard = ...;  // held for the whole op, made from the logits' device (CPU: nothing to do)
//   static void check(const RowsCall&);  // the backend's own limits (device, K, M)
//   static void forward(const RowsCall&, bool with_ce, const Tensor& ce, const Tensor& ntl,
//                       const Tensor& row_stats);  // ce is empty when !with_ce
//   static void backward(const RowsCall&, const Tensor& row_stats, const Tensor& grad_ce,
//                        const Tensor& grad_ntl, const Tensor& out);  // grad_ce undefined: NTL only
//   static void loss_and_grad(const RowsCall&, const Tensor& ce_scale, const Tensor& ntl_scale,
//                             const Tensor& ce, const Tensor& ntl, const Tensor& grad);
//   static Tensor new_gradient(const Tensor& logits);  // an uninitialised (M, V) like the logits
//   static void scale_gradient(const Tensor& grad, const Tensor& grad_output);  // grad *= grad_output
// `out` and `grad` may be the logits themselves (the in-place ops): the kernels read each row
// before writing it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "ntl_checks.h"

namespace ntl {

// One call's checked inputs, as the kernels receive them.
struct RowsCall {
  const at::Tensor& logits;  // (M, V), contiguous
  at::Tensor labels;         // (M,), contiguous
  TableTensors table;
  int64_t K;
  Options options;
};

template <class Kernels>
class Operators {
  using Tensor = at::Tensor;

 public:
  static void register_all(torch::Library& m) {
    m.impl("ntl_forward", &ntl_forward);
    m.impl("ce_ntl_forward", &ce_ntl_forward);
    m.impl("ntl_backward", &ntl_backward);
    m.impl("ce_ntl_backward", &ce_ntl_backward);
    m.impl("ce_ntl_backward_", &ce_ntl_backward_);
    m.impl("ce_ntl_loss_and_grad", &ce_ntl_loss_and_grad);
    m.impl("ce_ntl_loss_and_grad_", &ce_ntl_loss_and_grad_);
    m.impl("scale_gradient_", &scale_gradient_);
  }

  // ------------------------------------------------------------------------------------ the ops
  static std::tuple<Tensor, Tensor> ntl_forward(const Tensor& logits, const Tensor& labels, at::TensorList table,
                                                NTL_OPTION_PARAMS) {
    auto [ce, ntl, row_stats] = forward(logits, labels, table, make_options(NTL_OPTION_ARGS), false);
    return {ntl, row_stats};
  }

  static std::tuple<Tensor, Tensor, Tensor> ce_ntl_forward(const Tensor& logits, const Tensor& labels,
                                                           at::TensorList table, NTL_OPTION_PARAMS,
                                                           bool /*inplace_backward: read by the autograd*/) {
    return forward(logits, labels, table, make_options(NTL_OPTION_ARGS), true);
  }

  static Tensor ntl_backward(const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels,
                             const Tensor& row_stats, at::TensorList table, NTL_OPTION_PARAMS) {
    return backward(nullptr, Tensor(), grad_ntl, logits, labels, row_stats, table, make_options(NTL_OPTION_ARGS));
  }

  static Tensor ce_ntl_backward(const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits,
                                const Tensor& labels, const Tensor& row_stats, at::TensorList table,
                                NTL_OPTION_PARAMS) {
    TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
    return backward(nullptr, grad_ce, grad_ntl, logits, labels, row_stats, table, make_options(NTL_OPTION_ARGS));
  }

  static void ce_ntl_backward_(const Tensor& logits, const Tensor& grad_ce, const Tensor& grad_ntl,
                               const Tensor& labels, const Tensor& row_stats, at::TensorList table,
                               NTL_OPTION_PARAMS) {
    TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
    backward(&logits, grad_ce, grad_ntl, logits, labels, row_stats, table, make_options(NTL_OPTION_ARGS));
  }

  static std::tuple<Tensor, Tensor, Tensor> ce_ntl_loss_and_grad(const Tensor& logits, const Tensor& labels,
                                                                 const Tensor& ce_scale, const Tensor& ntl_scale,
                                                                 at::TensorList table, NTL_OPTION_PARAMS) {
    Tensor grad;
    auto [ce, ntl] = loss_and_grad(&grad, logits, labels, ce_scale, ntl_scale, table, make_options(NTL_OPTION_ARGS));
    return {ce, ntl, grad};
  }

  static std::tuple<Tensor, Tensor> ce_ntl_loss_and_grad_(const Tensor& logits, const Tensor& labels,
                                                          const Tensor& ce_scale, const Tensor& ntl_scale,
                                                          at::TensorList table, NTL_OPTION_PARAMS) {
    return loss_and_grad(nullptr, logits, labels, ce_scale, ntl_scale, table, make_options(NTL_OPTION_ARGS));
  }

  static void scale_gradient_(const Tensor& grad, const Tensor& grad_output) {
    check_gradient_scale(grad, grad_output);
    const typename Kernels::Guard guard(grad.device());
    Kernels::scale_gradient(grad, grad_output.to(accumulation_type(grad)));
  }

 private:
  static RowsCall prepare(const Tensor& logits, const Tensor& labels, at::TensorList table, const Options& opt) {
    const int64_t K = check_inputs(logits, labels, table);
    RowsCall call{logits, labels.contiguous(), table_tensors(table), K, opt};
    Kernels::check(call);
    return call;
  }

  static at::TensorOptions row_options(const Tensor& logits) {
    return logits.options().dtype(accumulation_type(logits));
  }

  // (ce, ntl, row_stats); ce is empty when !with_ce.
  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& logits, const Tensor& labels, at::TensorList table,
                                                    const Options& opt, bool with_ce) {
    const typename Kernels::Guard guard(logits.device());
    const RowsCall call = prepare(logits, labels, table, opt);
    const int64_t M = logits.size(0);
    Tensor ce = at::zeros({with_ce ? M : 0}, row_options(logits));
    Tensor ntl = at::empty({M}, row_options(logits));
    Tensor row_stats = at::empty({M, RowStats<float>::kSize}, row_options(logits));
    Kernels::forward(call, with_ce, ce, ntl, row_stats);
    return {ce, ntl, row_stats};
  }

  // d logits into *out, or into a new tensor when out is null; grad_ce undefined: NTL only.
  static Tensor backward(const Tensor* out, const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits,
                         const Tensor& labels, const Tensor& row_stats, at::TensorList table, const Options& opt) {
    const typename Kernels::Guard guard(logits.device());
    const RowsCall call = prepare(logits, labels, table, opt);
    check_row_stats(row_stats, logits);
    const Tensor ce_rows = grad_ce.defined() ? as_row_gradient(grad_ce, "grad_ce", logits) : Tensor();
    const Tensor ntl_rows = as_row_gradient(grad_ntl, "grad_ntl", logits);
    const Tensor grad = out != nullptr ? *out : Kernels::new_gradient(logits);
    Kernels::backward(call, row_stats, ce_rows, ntl_rows, grad);
    return grad;
  }

  // (ce, ntl) and the gradient: into *new_grad, a new tensor, when given; else over the logits.
  static std::tuple<Tensor, Tensor> loss_and_grad(Tensor* new_grad, const Tensor& logits, const Tensor& labels,
                                                  const Tensor& ce_scale, const Tensor& ntl_scale,
                                                  at::TensorList table, const Options& opt) {
    const typename Kernels::Guard guard(logits.device());
    const RowsCall call = prepare(logits, labels, table, opt);
    const Tensor ce_rows = as_row_gradient(ce_scale, "ce_scale", logits);
    const Tensor ntl_rows = as_row_gradient(ntl_scale, "ntl_scale", logits);
    const int64_t M = logits.size(0);
    Tensor ce = at::zeros({M}, row_options(logits));
    Tensor ntl = at::zeros({M}, row_options(logits));
    if (new_grad != nullptr) *new_grad = Kernels::new_gradient(logits);
    Kernels::loss_and_grad(call, ce_rows, ntl_rows, ce, ntl, new_grad != nullptr ? *new_grad : logits);
    return {ce, ntl};
  }
};

// The Guard of a backend whose ops need no device guard.
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

}  // namespace ntl
