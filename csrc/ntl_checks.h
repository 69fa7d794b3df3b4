// Argument checks and option plumbing shared by the CPU and CUDA implementations of the ntl_fast
// ops (csrc/ntl_ops.h calls them). Everything here runs on the host and reads no device memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>

#include "ntl_math.h"

namespace ntl {

// ---------------------------------------------------------------------------------------- options
// The options every op takes after the table (ntl_fast.LossConfig and the table's distance range;
// docs/math.md §2), declared once: the schema text, the C++ parameters and their names in the same
// order. The dispatcher checks at registration that each kernel's signature matches its schema.
//   loss: an ntl_fast.config.LossKind code (the enum LossKind of ntl_math.h, checked against the
//   Python class by tests/test_loss_codes.py).
#define NTL_OPTIONS_SCHEMA                                                                   \
  "int loss, float? squash_factor, float min_distance, float max_distance, bool reweigh, " \
  "float reweigh_constant, float? gaussian_sigma, int ignore_index"
#define NTL_OPTION_PARAMS                                                                              \
  int64_t loss, std::optional<double> squash_factor, double min_distance, double max_distance,         \
      bool reweigh, double reweigh_constant, std::optional<double> gaussian_sigma, int64_t ignore_index
#define NTL_OPTION_ARGS \
  loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant, gaussian_sigma, ignore_index

inline Options make_options(NTL_OPTION_PARAMS) {
  TORCH_CHECK(loss >= kWas && loss <= kWasCdf, "ntl_fast: loss must be an ntl_fast.config.LossKind code in [",
              int(kWas), ", ", int(kWasCdf), "], got ", loss);
  Options opt{};
  opt.loss = int(loss);
  opt.squash = squash_factor.has_value();
  if (opt.squash) {
    TORCH_CHECK(opt.loss == kWas, "ntl_fast: squash_factor applies to loss='was' only");
    TORCH_CHECK(*squash_factor > 1.0, "ntl_fast: squash_factor must be > 1, got ", *squash_factor);
    const double span = max_distance - min_distance;
    opt.squash_min = min_distance;
    opt.squash_scale = span > 0 ? (*squash_factor - 1.0) / span : 0.0;
  }
  opt.reweigh = reweigh;
  opt.reweigh_constant = reweigh_constant;
  opt.gaussian = gaussian_sigma.has_value();
  if (opt.gaussian) {
    TORCH_CHECK(*gaussian_sigma > 0.0, "ntl_fast: gaussian_sigma must be > 0, got ", *gaussian_sigma);
    opt.sigma = *gaussian_sigma;
  }
  opt.ignore_index = ignore_index;
  return opt;
}

// ---------------------------------------------------------------------------------------- dtypes
// float64 for float64 logits, float32 for every other dtype (docs/math.md §4): the dtype of every
// loss, saved statistic and internal sum; acc_type is the same rule for a C++ element type.
constexpr at::ScalarType accumulation_type(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType accumulation_type(const at::Tensor& logits) { return accumulation_type(logits.scalar_type()); }
template <typename scalar_t>
using acc_type = c10::impl::ScalarTypeToCPPTypeT<accumulation_type(c10::CppTypeToScalarType<scalar_t>::value)>;

// ---------------------------------------------------------------------------------------- the table
// The op's `Tensor[] table`: NumberTokenTable.kernel_tensors(), in the order of
// NumberTokenTable.KERNEL_TENSORS. Every tensor's shape, dtype and device is checked; the kernels
// read number_ids, number_values, number_index, value_order and sorted_gaps.
enum TableTensor : int {
  kNumberIds,
  kNumberValues,
  kNumberIndex,
  kValueOrder,
  kValueRank,
  kSortedGaps,
  kIsNumber,
  kTableTensors
};
constexpr const char* kTableTensorNames[kTableTensors] = {
    "number_ids", "number_values", "number_index", "value_order", "value_rank", "sorted_gaps", "is_number"};

struct TableTensors {
  const at::Tensor& number_ids;     // (K,) int64
  const at::Tensor& number_values;  // (K,) float32
  const at::Tensor& number_index;   // (V,) int64, -1 off N
  const at::Tensor& value_order;    // (K,) int64
  const at::Tensor& sorted_gaps;    // (K-1,) float32
};

inline TableTensors table_tensors(at::TensorList table) {
  TORCH_CHECK(table.size() == kTableTensors, "ntl_fast: table must be the ", int(kTableTensors),
              " tensors of NumberTokenTable.kernel_tensors(), got ", table.size());
  return {table[kNumberIds], table[kNumberValues], table[kNumberIndex], table[kValueOrder], table[kSortedGaps]};
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                         const at::Tensor& logits) {
  TORCH_CHECK(t.defined(), "ntl_fast: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "ntl_fast: ", name, " must have shape (", size,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "ntl_fast: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "ntl_fast: ", name, " is on ", t.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(t.is_contiguous(), "ntl_fast: ", name, " must be contiguous");
}

// Checks logits (M, V), labels (M,) and the table; returns K.
inline int64_t check_inputs(const at::Tensor& logits, const at::Tensor& labels, at::TensorList table) {
  TORCH_CHECK(logits.dim() == 2, "ntl_fast: logits must be 2-D (M, V), got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "ntl_fast: logits must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(logits.is_contiguous(), "ntl_fast: logits must be contiguous (call .contiguous()), got strides ",
              logits.strides());
  const int64_t M = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "ntl_fast: logits have an empty vocabulary dimension");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == M, "ntl_fast: labels must have shape (", M,
              ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "ntl_fast: labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), "ntl_fast: labels are on ", labels.device(),
              " but logits on ", logits.device());
  table_tensors(table);  // the count
  const at::Tensor& ids = table[kNumberIds];
  const int64_t K = ids.defined() && ids.dim() == 1 ? ids.size(0) : -1;
  TORCH_CHECK(K >= 1, "ntl_fast: number_ids must be a non-empty 1-D tensor, got shape ",
              ids.defined() ? ids.sizes() : at::IntArrayRef{});
  const struct {
    at::ScalarType dtype;
    int64_t size;
  } expected[kTableTensors] = {{at::kLong, K}, {at::kFloat, K}, {at::kLong, V},   {at::kLong, K},
                               {at::kLong, K}, {at::kFloat, K - 1}, {at::kBool, V}};
  for (int i = 0; i < kTableTensors; ++i)
    check_tensor(table[i], kTableTensorNames[i], expected[i].dtype, expected[i].size, logits);
  return K;
}

// ---------------------------------------------------------------------------------------- row arrays
// An upstream gradient or scale per row, (M,), in the accumulation dtype and contiguous.
inline at::Tensor as_row_gradient(const at::Tensor& grad, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(grad.defined(), "ntl_fast: ", name, " is undefined");
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), "ntl_fast: ", name, " must have shape (",
              logits.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(grad.is_floating_point(), "ntl_fast: ", name, " must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), "ntl_fast: ", name, " is on ", grad.device(), " but logits on ",
              logits.device());
  return grad.to(accumulation_type(logits)).contiguous();
}

// The per-row statistics saved by the forward (RowStats, (M, kSize) in the accumulation dtype),
// which the backward indexes as a dense array.
inline void check_row_stats(const at::Tensor& t, const at::Tensor& logits) {
  const auto acc = accumulation_type(logits);
  constexpr int64_t size = RowStats<float>::kSize;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == size,
              "ntl_fast: row_stats must have shape (", logits.size(0), ", ", size, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "ntl_fast: row_stats must be ", acc, " for ", logits.scalar_type(),
              " logits, got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "ntl_fast: row_stats is on ", t.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(t.is_contiguous(), "ntl_fast: row_stats must be contiguous, got strides ", t.strides());
}

// grad (any shape, contiguous, a logits dtype) and grad_output (0-d, floating point, same device).
inline void check_gradient_scale(const at::Tensor& grad, const at::Tensor& grad_output) {
  const auto dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "ntl_fast: grad must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(grad.is_contiguous(), "ntl_fast: grad must be contiguous, got strides ", grad.strides());
  TORCH_CHECK(grad_output.dim() == 0, "ntl_fast: grad_output must be a 0-d tensor, got shape ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.is_floating_point(), "ntl_fast: grad_output must be floating point, got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == grad.device(), "ntl_fast: grad_output is on ", grad_output.device(),
              " but grad on ", grad.device());
}

}  // namespace ntl
