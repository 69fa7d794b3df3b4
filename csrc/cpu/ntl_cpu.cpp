// CPU kernels of the ntl_fast operators.
//
// Rows are split across threads with at::parallel_for. Per row, the forward reads the logits once
// (blocked online max + log-sum-exp, at::vec vectorised, float32 accumulation; float64 for float64
// logits) and the backward reads and writes each element once; ce_ntl_loss_and_grad runs both on
// each row in turn, so the logits come from memory once. The K number-token columns go through the
// shared math in ntl_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ntl_checks.h"
#include "../ntl_math.h"

namespace ntl {
namespace {

using at::Tensor;
using fVec = at::vec::Vectorized<float>;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Two float vectors' worth of elements: the width of one Vectorized<BFloat16/Half>.
constexpr int64_t kStep = 2 * fVec::size();
// zero_mask() of a vector whose lanes are all zero.
constexpr int kAllLanes = (1 << fVec::size()) - 1;

template <typename scalar_t>
inline void load_step(const scalar_t* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kStep, "unexpected vector width");
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store_step(scalar_t* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// LSE_V = log Σ_k exp(z_k) in one pass: a running max and sum per vector lane, rescaled once per
// block of 2 * kStep elements (about one exp per element).
template <typename scalar_t>
acc_type<scalar_t> row_logsumexp(const scalar_t* z, int64_t V) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, z[i]);
    if (std::isnan(mx)) return mx;
    if (mx == -std::numeric_limits<acc_t>::infinity()) return mx;
    acc_t sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(z[i] - mx);
    return mx + std::log(sum);
  } else {
    fVec vmax(-FLT_MAX), vsum(0.0f);
    int64_t i = 0;
    for (; i + 2 * kStep <= V; i += 2 * kStep) {
      fVec x0, x1, x2, x3;
      load_step(z + i, x0, x1);
      load_step(z + i + kStep, x2, x3);
      const fVec next = at::vec::maximum(vmax, at::vec::maximum(at::vec::maximum(x0, x1), at::vec::maximum(x2, x3)));
      // Rescale the running sums only when some lane's max moved (rare after the first blocks).
      if ((next - vmax).zero_mask() != kAllLanes) vsum = vsum * (vmax - next).exp_u20();
      vsum = vsum + (((x0 - next).exp_u20() + (x1 - next).exp_u20()) + ((x2 - next).exp_u20() + (x3 - next).exp_u20()));
      vmax = next;
    }
    float lane_max[fVec::size()], lane_sum[fVec::size()];
    vmax.store(lane_max);
    vsum.store(lane_sum);
    float mx = -FLT_MAX;
    bool nan = false;
    for (int64_t l = 0; l < fVec::size(); ++l) {
      nan |= std::isnan(lane_max[l]);
      mx = std::max(mx, lane_max[l]);
    }
    for (int64_t j = i; j < V; ++j) {
      const float x = float(z[j]);
      nan |= std::isnan(x);
      mx = std::max(mx, x);
    }
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    float sum = 0.0f;
    for (int64_t l = 0; l < fVec::size(); ++l) sum += lane_sum[l] * std::exp(lane_max[l] - mx);
    for (int64_t j = i; j < V; ++j) sum += std::exp(float(z[j]) - mx);
    return mx + std::log(sum);
  }
}

// out_k = coef * exp(z_k - lse) over the row (z and out may be the same buffer).
template <typename scalar_t>
void row_scaled_softmax(const scalar_t* z, scalar_t* out, int64_t V, acc_type<scalar_t> lse,
                        acc_type<scalar_t> coef) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const fVec vlse(lse), vcoef(coef);
    for (; i + kStep <= V; i += kStep) {
      fVec a, b;
      load_step(z + i, a, b);
      store_step(out + i, vcoef * (a - vlse).exp_u20(), vcoef * (b - vlse).exp_u20());
    }
  }
  for (; i < V; ++i) out[i] = scalar_t(coef * std::exp(acc_type<scalar_t>(z[i]) - lse));
}

// A row's number-token logits, gathered once into acc_t scratch (so that an in-place backward
// may overwrite the logits after reading them).
template <typename acc_t>
struct GatheredRow {
  const acc_t* number_logits;
  const float* values;
  const int64_t* order;
  const float* gaps;
  int64_t K;

  acc_t logit(int64_t k) const { return number_logits[k]; }
  float value(int64_t k) const { return values[k]; }
  int64_t sorted(int64_t i) const {
    const int64_t o = order[i];
    return (o >= 0 && o < K) ? o : -1;
  }
  float gap(int64_t i) const { return gaps[i]; }
};

template <typename scalar_t, typename acc_t>
void gather_number_logits(const scalar_t* z, const int64_t* ids, int64_t K, int64_t V, acc_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = ids[k];
    out[k] = (id >= 0 && id < V) ? acc_t(z[id]) : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

inline int64_t read_label(const Tensor& labels, const void* data, int64_t r) {
  return labels.scalar_type() == at::kInt ? int64_t(static_cast<const int32_t*>(data)[r])
                                          : static_cast<const int64_t*>(data)[r];
}

// Rows per task: about 32K elements of work each (ATen's grain size).
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, int64_t(32768) / std::max<int64_t>(V, 1)); }

// One row's losses and the statistics its backward needs.
template <typename acc_t>
struct RowLosses {
  acc_t ce, ntl, lse_vocab, lse_number;
};

// The forward of row z (one read of it); gathers its number logits into number_logits, which
// `row` views. LSE_V is computed only where CE or the reweighing needs it (else 0).
template <typename scalar_t, typename acc_t>
RowLosses<acc_t> forward_row(const scalar_t* z, int64_t V, const RowLabel& lab, const int64_t* ids,
                             const GatheredRow<acc_t>& row, acc_t* number_logits, bool with_ce,
                             const Options& opt) {
  RowLosses<acc_t> out{0, 0, 0, 0};
  if (!lab.bad && ((with_ce && lab.in_range) || (opt.reweigh && lab.number >= 0)))
    out.lse_vocab = row_logsumexp(z, V);
  if (!lab.bad && lab.number >= 0) {
    gather_number_logits(z, ids, row.K, V, number_logits);
    out.lse_number = number_logsumexp<acc_t>(row);
  }
  const acc_t z_label = lab.in_range ? acc_t(z[lab.label]) : acc_t(0);
  row_forward(row, lab, z_label, out.lse_vocab, out.lse_number, with_ce, opt, &out.ce, &out.ntl);
  return out;
}

// Writes d(grad_ce·CE + grad_ntl·NTL)/dz of row z into o (which may be z itself: every value
// the fixes need is read before the dense write).
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* z, scalar_t* o, int64_t V, const RowLabel& lab, const int64_t* ids,
                  const GatheredRow<acc_t>& row, acc_t* number_logits, acc_t* fix, acc_t lse_vocab,
                  acc_t lse_number, acc_t grad_ce, acc_t grad_ntl, bool with_ce, const Options& opt) {
  if (!lab.bad && lab.number >= 0) gather_number_logits(z, ids, row.K, V, number_logits);
  const acc_t z_label = lab.in_range ? acc_t(z[lab.label]) : acc_t(0);
  const RowGradient<acc_t> g =
      row_backward(row, lab, z_label, lse_vocab, lse_number, grad_ce, grad_ntl, with_ce, opt, fix);
  if (g.coef != acc_t(0)) {
    row_scaled_softmax(z, o, V, lse_vocab, g.coef);
  } else {
    std::fill(o, o + V, scalar_t(0));
  }
  if (g.number_fix) {
    for (int64_t k = 0; k < row.K; ++k) {
      const int64_t id = ids[k];
      if (id >= 0 && id < V) o[id] = scalar_t(fix[k]);
    }
  }
  if (g.label_column >= 0) o[g.label_column] = scalar_t(g.label_fix);
}

// Returns (ce, ntl, lse_vocab, lse_number); ce is empty when !with_ce.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& logits, const Tensor& labels_in,
                                                       const TableTensors& table, const Options& opt,
                                                       bool with_ce) {
  const int64_t K = check_inputs(logits, labels_in, table);
  TORCH_CHECK(logits.device().is_cpu(), "ntl_fast: CPU kernel called with ", logits.device(), " tensors");
  const Tensor labels = labels_in.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  const auto acc = accumulation_type(logits);
  auto options = logits.options().dtype(acc);
  Tensor ce = at::zeros({with_ce ? M : 0}, options);
  Tensor ntl = at::zeros({M}, options);
  Tensor lse_vocab = at::zeros({M}, options);
  Tensor lse_number = at::zeros({M}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    const void* label_data = labels.const_data_ptr();
    const int64_t* ids = table.number_ids.const_data_ptr<int64_t>();
    const int64_t* index = table.number_index.const_data_ptr<int64_t>();
    acc_t* ce_out = with_ce ? ce.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ntl_out = ntl.mutable_data_ptr<acc_t>();
    acc_t* lse_v_out = lse_vocab.mutable_data_ptr<acc_t>();
    acc_t* lse_n_out = lse_number.mutable_data_ptr<acc_t>();
    at::parallel_for(0, M, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> number_logits(K);
      GatheredRow<acc_t> row{number_logits.data(), table.number_values.const_data_ptr<float>(),
                             table.value_order.const_data_ptr<int64_t>(),
                             table.sorted_gaps.const_data_ptr<float>(), K};
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* z = z_all + r * V;
        const RowLabel lab = classify_label(read_label(labels, label_data, r), V, K, index, opt.ignore_index);
        const RowLosses<acc_t> f = forward_row(z, V, lab, ids, row, number_logits.data(), with_ce, opt);
        if (with_ce) ce_out[r] = f.ce;
        ntl_out[r] = f.ntl;
        lse_v_out[r] = f.lse_vocab;
        lse_n_out[r] = f.lse_number;
      }
    });
  });
  return {ce, ntl, lse_vocab, lse_number};
}

Tensor as_row_gradient(const Tensor& grad, const char* name, const Tensor& logits) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), "ntl_fast: ", name, " must have shape (",
              logits.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(grad.is_floating_point(), "ntl_fast: ", name, " must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == logits.device(), "ntl_fast: ", name, " is on ", grad.device(), " but logits on ",
              logits.device());
  return grad.to(accumulation_type(logits)).contiguous();
}

// Writes d logits into `out` (which may be `logits` itself). grad_ce undefined: NTL only.
void backward_cpu(const Tensor& out, const Tensor& grad_ce_in, const Tensor& grad_ntl_in, const Tensor& logits,
                  const Tensor& labels_in, const Tensor& lse_vocab, const Tensor& lse_number,
                  const TableTensors& table, const Options& opt) {
  const int64_t K = check_inputs(logits, labels_in, table);
  TORCH_CHECK(logits.device().is_cpu(), "ntl_fast: CPU kernel called with ", logits.device(), " tensors");
  check_row_tensor(lse_vocab, "lse_vocab", logits);
  check_row_tensor(lse_number, "lse_number", logits);
  const bool with_ce = grad_ce_in.defined();
  const Tensor grad_ce = with_ce ? as_row_gradient(grad_ce_in, "grad_ce", logits) : Tensor();
  const Tensor grad_ntl = as_row_gradient(grad_ntl_in, "grad_ntl", logits);
  const Tensor labels = labels_in.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    scalar_t* out_all = out.mutable_data_ptr<scalar_t>();
    const void* label_data = labels.const_data_ptr();
    const int64_t* ids = table.number_ids.const_data_ptr<int64_t>();
    const int64_t* index = table.number_index.const_data_ptr<int64_t>();
    const acc_t* g_ce = with_ce ? grad_ce.const_data_ptr<acc_t>() : nullptr;
    const acc_t* g_ntl = grad_ntl.const_data_ptr<acc_t>();
    const acc_t* lse_v = lse_vocab.const_data_ptr<acc_t>();
    const acc_t* lse_n = lse_number.const_data_ptr<acc_t>();
    at::parallel_for(0, M, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> number_logits(K), fix(K);
      GatheredRow<acc_t> row{number_logits.data(), table.number_values.const_data_ptr<float>(),
                             table.value_order.const_data_ptr<int64_t>(),
                             table.sorted_gaps.const_data_ptr<float>(), K};
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* z = z_all + r * V;
        scalar_t* o = out_all + r * V;
        const RowLabel lab = classify_label(read_label(labels, label_data, r), V, K, index, opt.ignore_index);
        backward_row(z, o, V, lab, ids, row, number_logits.data(), fix.data(), lse_v[r], lse_n[r],
                     with_ce ? g_ce[r] : acc_t(0), g_ntl[r], with_ce, opt);
      }
    });
  });
}

// Asks Linux to back a fresh buffer with transparent huge pages (honoured in THP "madvise" and
// "always" modes): its first write then takes one page fault per 2 MiB instead of one per 4 KiB.
// The faults dominate writing a fresh M x V gradient (526 MB: about 150 ms fresh, 50 ms when
// already mapped, on 2 cores). A hint only; failure is harmless.
void advise_huge_pages(const Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + buffer.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// CE and NTL per row and d(Σ ce_scale·CE + Σ ntl_scale·NTL)/d logits, each row's gradient
// written right after its forward while the row is still in cache: one read of the logits from
// memory and one write of the gradient.
std::tuple<Tensor, Tensor, Tensor> loss_and_grad_cpu(const Tensor& logits, const Tensor& labels_in,
                                                     const Tensor& ce_scale_in, const Tensor& ntl_scale_in,
                                                     const TableTensors& table, const Options& opt) {
  const int64_t K = check_inputs(logits, labels_in, table);
  TORCH_CHECK(logits.device().is_cpu(), "ntl_fast: CPU kernel called with ", logits.device(), " tensors");
  const Tensor ce_scale = as_row_gradient(ce_scale_in, "ce_scale", logits);
  const Tensor ntl_scale = as_row_gradient(ntl_scale_in, "ntl_scale", logits);
  const Tensor labels = labels_in.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  auto options = logits.options().dtype(accumulation_type(logits));
  Tensor ce = at::empty({M}, options);
  Tensor ntl = at::empty({M}, options);
  Tensor grad = at::empty_like(logits);
  advise_huge_pages(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_loss_and_grad_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    scalar_t* grad_all = grad.mutable_data_ptr<scalar_t>();
    const void* label_data = labels.const_data_ptr();
    const int64_t* ids = table.number_ids.const_data_ptr<int64_t>();
    const int64_t* index = table.number_index.const_data_ptr<int64_t>();
    const acc_t* g_ce = ce_scale.const_data_ptr<acc_t>();
    const acc_t* g_ntl = ntl_scale.const_data_ptr<acc_t>();
    acc_t* ce_out = ce.mutable_data_ptr<acc_t>();
    acc_t* ntl_out = ntl.mutable_data_ptr<acc_t>();
    at::parallel_for(0, M, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> number_logits(K), fix(K);
      GatheredRow<acc_t> row{number_logits.data(), table.number_values.const_data_ptr<float>(),
                             table.value_order.const_data_ptr<int64_t>(),
                             table.sorted_gaps.const_data_ptr<float>(), K};
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* z = z_all + r * V;
        const RowLabel lab = classify_label(read_label(labels, label_data, r), V, K, index, opt.ignore_index);
        const RowLosses<acc_t> f = forward_row(z, V, lab, ids, row, number_logits.data(), true, opt);
        ce_out[r] = f.ce;
        ntl_out[r] = f.ntl;
        backward_row(z, grad_all + r * V, V, lab, ids, row, number_logits.data(), fix.data(), f.lse_vocab,
                     f.lse_number, g_ce[r], g_ntl[r], true, opt);
      }
    });
  });
  return {ce, ntl, grad};
}

// The out-of-place backward of either operation (grad_ce undefined: NTL alone) into a new tensor.
Tensor fresh_gradient(const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels,
                      const Tensor& lse_vocab, const Tensor& lse_number, const TableTensors& table,
                      const Options& opt) {
  check_inputs(logits, labels, table);
  Tensor out = at::empty_like(logits);
  advise_huge_pages(out);
  backward_cpu(out, grad_ce, grad_ntl, logits, labels, lse_vocab, lse_number, table, opt);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> ntl_forward(const Tensor& logits, const Tensor& labels, const Tensor& number_ids,
                                               const Tensor& number_values, const Tensor& number_index,
                                               const Tensor& value_order, const Tensor& sorted_gaps,
                                               c10::string_view loss, std::optional<double> squash_factor,
                                               double min_distance, double max_distance, bool reweigh,
                                               double reweigh_constant, std::optional<double> gaussian_sigma,
                                               int64_t ignore_index) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  auto [ce, ntl, lse_v, lse_n] = forward_cpu(
      logits, labels, {number_ids, number_values, number_index, value_order, sorted_gaps}, opt, false);
  return {ntl, lse_v, lse_n};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ce_ntl_forward(
    const Tensor& logits, const Tensor& labels, const Tensor& number_ids, const Tensor& number_values,
    const Tensor& number_index, const Tensor& value_order, const Tensor& sorted_gaps, c10::string_view loss,
    std::optional<double> squash_factor, double min_distance, double max_distance, bool reweigh,
    double reweigh_constant, std::optional<double> gaussian_sigma, int64_t ignore_index, bool /*inplace_backward*/) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return forward_cpu(logits, labels, {number_ids, number_values, number_index, value_order, sorted_gaps}, opt,
                     true);
}

Tensor ntl_backward(const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels, const Tensor& lse_vocab,
                    const Tensor& lse_number, const Tensor& number_ids, const Tensor& number_values,
                    const Tensor& number_index, const Tensor& value_order, const Tensor& sorted_gaps,
                    c10::string_view loss, std::optional<double> squash_factor, double min_distance,
                    double max_distance, bool reweigh, double reweigh_constant,
                    std::optional<double> gaussian_sigma, int64_t ignore_index) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return fresh_gradient(Tensor(), grad_ntl, logits, labels, lse_vocab, lse_number,
                        {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

Tensor ce_ntl_backward(const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& logits, const Tensor& labels,
                       const Tensor& lse_vocab, const Tensor& lse_number, const Tensor& number_ids,
                       const Tensor& number_values, const Tensor& number_index, const Tensor& value_order,
                       const Tensor& sorted_gaps, c10::string_view loss, std::optional<double> squash_factor,
                       double min_distance, double max_distance, bool reweigh, double reweigh_constant,
                       std::optional<double> gaussian_sigma, int64_t ignore_index) {
  TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return fresh_gradient(grad_ce, grad_ntl, logits, labels, lse_vocab, lse_number,
                        {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

void ce_ntl_backward_(const Tensor& logits, const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& labels,
                      const Tensor& lse_vocab, const Tensor& lse_number, const Tensor& number_ids,
                      const Tensor& number_values, const Tensor& number_index, const Tensor& value_order,
                      const Tensor& sorted_gaps, c10::string_view loss, std::optional<double> squash_factor,
                      double min_distance, double max_distance, bool reweigh, double reweigh_constant,
                      std::optional<double> gaussian_sigma, int64_t ignore_index) {
  TORCH_CHECK(grad_ce.defined(), "ntl_fast: grad_ce is undefined");
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  backward_cpu(logits, grad_ce, grad_ntl, logits, labels, lse_vocab, lse_number,
               {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

std::tuple<Tensor, Tensor, Tensor> ce_ntl_loss_and_grad(
    const Tensor& logits, const Tensor& labels, const Tensor& ce_scale, const Tensor& ntl_scale,
    const Tensor& number_ids, const Tensor& number_values, const Tensor& number_index, const Tensor& value_order,
    const Tensor& sorted_gaps, c10::string_view loss, std::optional<double> squash_factor, double min_distance,
    double max_distance, bool reweigh, double reweigh_constant, std::optional<double> gaussian_sigma,
    int64_t ignore_index) {
  const Options opt = make_options(loss, squash_factor, min_distance, max_distance, reweigh, reweigh_constant,
                                   gaussian_sigma, ignore_index);
  return loss_and_grad_cpu(logits, labels, ce_scale, ntl_scale,
                           {number_ids, number_values, number_index, value_order, sorted_gaps}, opt);
}

}  // namespace
}  // namespace ntl

TORCH_LIBRARY_IMPL(ntl_fast, CPU, m) {
  m.impl("ntl_forward", &ntl::ntl_forward);
  m.impl("ce_ntl_forward", &ntl::ce_ntl_forward);
  m.impl("ntl_backward", &ntl::ntl_backward);
  m.impl("ce_ntl_backward", &ntl::ce_ntl_backward);
  m.impl("ce_ntl_backward_", &ntl::ce_ntl_backward_);
  m.impl("ce_ntl_loss_and_grad", &ntl::ce_ntl_loss_and_grad);
}
