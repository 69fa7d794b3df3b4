// The ntl_fast operators: every schema, declared once. Each backend registers its kernels in its
// own file (csrc/cpu/ntl_cpu.cpp, csrc/cuda/ntl_cuda.cpp); autograd and the fake (meta) kernels
// are registered from Python, in ntl_fast/cpp.py.
//
// Shared argument groups:
//   table:   number_ids (K,) int64, number_values (K,) float32, number_index (V,) int64,
//            value_order (K,) int64, sorted_gaps (K-1,) float32   (ntl_fast.NumberTokenTable)
//   options: loss ("was", "mse", "mae", "huber", "was_cdf"), squash_factor, the table's non-zero
//            distance range, reweigh and its constant c, gaussian_sigma, ignore_index
//            (ntl_fast.LossConfig; docs/math.md §2)
// Losses and the saved per-row statistics are float32 (float64 for float64 logits); gradients
// have the logits' dtype. row_stats (M, 5) is what a forward saves for its backward (RowStats of
// csrc/ntl_math.h: LSE_V and LSE_N each as max and log-sum, and log(1 - m)); its layout is
// private to these operators.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import ntl_fast._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define NTL_TABLE "Tensor number_ids, Tensor number_values, Tensor number_index, Tensor value_order, Tensor sorted_gaps"
#define NTL_OPTIONS                                                                          \
  "str loss, float? squash_factor, float min_distance, float max_distance, bool reweigh, " \
  "float reweigh_constant, float? gaussian_sigma, int ignore_index"

TORCH_LIBRARY(ntl_fast, m) {
  // NTL per row (0 off the NTL-valid rows, NaN at bad labels), with the row statistics saved for
  // the backward.
  m.def("ntl_forward(Tensor logits, Tensor labels, " NTL_TABLE ", " NTL_OPTIONS
        ") -> (Tensor loss, Tensor row_stats)");
  // CE (or Gaussian-CE) and NTL per row from one pass over each row of logits. inplace_backward
  // makes the registered autograd write the gradient into the logits' buffer (ce_ntl_backward_).
  m.def("ce_ntl_forward(Tensor logits, Tensor labels, " NTL_TABLE ", " NTL_OPTIONS
        ", bool inplace_backward=False) -> (Tensor ce, Tensor ntl, Tensor row_stats)");
  // d logits = grad_ntl * dNTL/dz, one write per element.
  m.def("ntl_backward(Tensor grad_ntl, Tensor logits, Tensor labels, Tensor row_stats, " NTL_TABLE
        ", " NTL_OPTIONS ") -> Tensor");
  // d logits = grad_ce * (p - target) + grad_ntl * dNTL/dz, one read and one write per element.
  m.def("ce_ntl_backward(Tensor grad_ce, Tensor grad_ntl, Tensor logits, Tensor labels, Tensor row_stats, "
        NTL_TABLE ", " NTL_OPTIONS ") -> Tensor");
  // The same gradient, written over the logits themselves (saves one M x V allocation).
  m.def("ce_ntl_backward_(Tensor(a!) logits, Tensor grad_ce, Tensor grad_ntl, Tensor labels, Tensor row_stats, "
        NTL_TABLE ", " NTL_OPTIONS ") -> ()");
  // CE and NTL per row and d(Σ ce_scale * ce + Σ ntl_scale * ntl)/d logits, each row's gradient
  // written while the row is still in cache: the whole forward and backward of reductions "mean"
  // and "sum" in one read of the logits. CPU only.
  m.def("ce_ntl_loss_and_grad(Tensor logits, Tensor labels, Tensor ce_scale, Tensor ntl_scale, " NTL_TABLE
        ", " NTL_OPTIONS ") -> (Tensor ce, Tensor ntl, Tensor grad)");
}
