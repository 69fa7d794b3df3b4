// The ntl_fast operators: every schema, declared once. Each backend registers its kernels in its
// own file (csrc/cpu/ntl_cpu.cpp, csrc/cuda/ntl_cuda.cpp) through the shared host code of
// csrc/ntl_ops.h; autograd and the fake (meta) kernels are registered from Python, in
// ntl_fast/cpp.py.
//
// Shared arguments:
//   table:   NumberTokenTable.kernel_tensors(), one list in the order of
//            NumberTokenTable.KERNEL_TENSORS: number_ids (K,) int64, number_values (K,) float32,
//            number_index (V,) int64, value_order (K,) int64, value_rank (K,) int64,
//            sorted_gaps (K-1,) float32, is_number (V,) bool (the kernels read what they need)
//   options: NTL_OPTIONS_SCHEMA of csrc/ntl_checks.h: loss (an ntl_fast.config.LossKind code),
//            squash_factor, the table's non-zero distance range, reweigh and its constant c,
//            gaussian_sigma, ignore_index (ntl_fast.LossConfig; docs/math.md §2)
// Losses and the saved per-row statistics are float32 (float64 for float64 logits); gradients
// have the logits' dtype. row_stats (M, 5) is what a forward saves for its backward (RowStats of
// csrc/ntl_math.h: LSE_V and LSE_N each as max and log-sum, and log(1 - m)); its layout is
// private to these operators. Ops ending in `_` write into their `Tensor(a!)` argument.
#include <Python.h>
#include <torch/library.h>

#include "ntl_checks.h"

extern "C" {
// `import ntl_fast._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define NTL_TABLE_AND_OPTIONS "Tensor[] table, " NTL_OPTIONS_SCHEMA

TORCH_LIBRARY(ntl_fast, m) {
  // NTL per row (0 off the NTL-valid rows, NaN at bad labels), with the row statistics saved for
  // the backward.
  m.def("ntl_forward(Tensor logits, Tensor labels, " NTL_TABLE_AND_OPTIONS ") -> (Tensor loss, Tensor row_stats)");
  // CE (or Gaussian-CE) and NTL per row from one pass over each row of logits. inplace_backward
  // makes the registered autograd write the gradient into the logits' buffer (ce_ntl_backward_).
  m.def("ce_ntl_forward(Tensor logits, Tensor labels, " NTL_TABLE_AND_OPTIONS
        ", bool inplace_backward=False) -> (Tensor ce, Tensor ntl, Tensor row_stats)");
  // d logits = grad_ntl * dNTL/dz, one write per element.
  m.def("ntl_backward(Tensor grad_ntl, Tensor logits, Tensor labels, Tensor row_stats, " NTL_TABLE_AND_OPTIONS
        ") -> Tensor");
  // d logits = grad_ce * (p - target) + grad_ntl * dNTL/dz, one read and one write per element.
  m.def("ce_ntl_backward(Tensor grad_ce, Tensor grad_ntl, Tensor logits, Tensor labels, Tensor row_stats, "
        NTL_TABLE_AND_OPTIONS ") -> Tensor");
  // The same gradient, written over the logits themselves (saves one M x V allocation).
  m.def("ce_ntl_backward_(Tensor(a!) logits, Tensor grad_ce, Tensor grad_ntl, Tensor labels, Tensor row_stats, "
        NTL_TABLE_AND_OPTIONS ") -> ()");
  // CE and NTL per row and d(Σ ce_scale * ce + Σ ntl_scale * ntl)/d logits, each row's gradient
  // written while the row is still in cache: the whole forward and backward of reductions "mean"
  // and "sum" in one read of the logits and one write of the gradient.
  m.def("ce_ntl_loss_and_grad(Tensor logits, Tensor labels, Tensor ce_scale, Tensor ntl_scale, "
        NTL_TABLE_AND_OPTIONS ") -> (Tensor ce, Tensor ntl, Tensor grad)");
  // The same, with the gradient written over the logits themselves; returns the losses.
  m.def("ce_ntl_loss_and_grad_(Tensor(a!) logits, Tensor labels, Tensor ce_scale, Tensor ntl_scale, "
        NTL_TABLE_AND_OPTIONS ") -> (Tensor ce, Tensor ntl)");
  // grad *= grad_output (0-d, on grad's device, read there): the backward of the two ops above
  // under a loss scale; nothing is read or written when grad_output is 1.
  m.def("scale_gradient_(Tensor(a!) grad, Tensor grad_output) -> ()");
}
