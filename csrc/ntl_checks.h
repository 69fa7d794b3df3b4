// Argument checks and option parsing shared by the CPU and CUDA implementations of the ntl_fast ops.
// Everything here runs on the host and reads no device memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "ntl_math.h"

namespace ntl {

inline int parse_loss(c10::string_view loss) {
  const std::string name(loss.data(), loss.size());
  if (name == "was") return kWas;
  if (name == "mse") return kMse;
  if (name == "mae") return kMae;
  if (name == "huber") return kHuber;
  if (name == "was_cdf") return kWasCdf;
  TORCH_CHECK(false, "ntl_fast: loss must be one of was, mse, mae, huber, was_cdf; got '", name, "'");
}

inline Options make_options(c10::string_view loss, std::optional<double> squash_factor,
                            double min_distance, double max_distance, bool reweigh,
                            double reweigh_constant, std::optional<double> gaussian_sigma,
                            int64_t ignore_index) {
  Options opt{};
  opt.loss = parse_loss(loss);
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

// The number-token table's tensors, as NumberTokenTable holds them.
struct TableTensors {
  const at::Tensor& number_ids;     // (K,) int64
  const at::Tensor& number_values;  // (K,) float32
  const at::Tensor& number_index;   // (V,) int64, -1 off N
  const at::Tensor& value_order;    // (K,) int64
  const at::Tensor& sorted_gaps;    // (K-1,) float32
};

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
inline int64_t check_inputs(const at::Tensor& logits, const at::Tensor& labels, const TableTensors& table) {
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
  const int64_t K = table.number_ids.dim() == 1 ? table.number_ids.size(0) : -1;
  TORCH_CHECK(K >= 1, "ntl_fast: number_ids must be a non-empty 1-D tensor, got shape ",
              table.number_ids.sizes());
  check_tensor(table.number_ids, "number_ids", at::kLong, K, logits);
  check_tensor(table.number_values, "number_values", at::kFloat, K, logits);
  check_tensor(table.number_index, "number_index", at::kLong, V, logits);
  check_tensor(table.value_order, "value_order", at::kLong, K, logits);
  check_tensor(table.sorted_gaps, "sorted_gaps", at::kFloat, K - 1, logits);
  return K;
}

inline at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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

}  // namespace ntl
