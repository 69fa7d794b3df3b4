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

#include "../ntl_math.h"
#include "../ntl_ops.h"

namespace ntl {
namespace {

using at::Tensor;
using fVec = at::vec::Vectorized<float>;

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

// Online log-sum-exp over ranges of one row (docs/math.md §4): a running max and sum per vector
// lane, rescaled once per block of kBlock elements (about one exp per element), and a scalar
// running pair for float64 and for the ends of ranges. acc_t float: vectorised, from float,
// bfloat16 or float16 elements; acc_t double: scalar. The lane sums are compensated (Kahan): in a
// confident row the lane holding the largest logit sums 1 plus about V/8 terms each below half its
// rounding step, which a plain sum drops (at V = 151936 that lost ~1e-5 of the text mass).
template <typename acc_t>
class RowLogSumExp {
 public:
  static constexpr int64_t kBlock = 2 * kStep;

  template <typename T>
  void add(const T* z, int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<acc_t, float>) {
      for (; i + kBlock <= end; i += kBlock) {
        fVec x0, x1, x2, x3;
        load_step(z + i, x0, x1);
        load_step(z + i + kStep, x2, x3);
        const fVec next =
            at::vec::maximum(vmax_, at::vec::maximum(at::vec::maximum(x0, x1), at::vec::maximum(x2, x3)));
        // Rescale the running sums only when some lane's max moved (rare after the first blocks).
        if ((next - vmax_).zero_mask() != kAllLanes) {
          const fVec rescale = (vmax_ - next).exp_u20();
          vsum_ = vsum_ * rescale;
          vcarry_ = vcarry_ * rescale;
        }
        const fVec term = (((x0 - next).exp_u20() + (x1 - next).exp_u20()) +
                           ((x2 - next).exp_u20() + (x3 - next).exp_u20())) - vcarry_;
        const fVec total = vsum_ + term;
        vcarry_ = (total - vsum_) - term;
        vsum_ = total;
        vmax_ = next;
      }
    }
    for (; i < end; i += kBlock) add_scalar_block(z, i, std::min(i + kBlock, end));
  }

  LogSumExp<acc_t> result() const {
    acc_t mx = max_;
    bool nan = nan_;
    acc_t lane_max[fVec::size()], lane_sum[fVec::size()];
    if constexpr (std::is_same_v<acc_t, float>) {
      vmax_.store(lane_max);
      (vsum_ - vcarry_).store(lane_sum);
      for (int64_t l = 0; l < fVec::size(); ++l) {
        nan |= std::isnan(lane_max[l]);
        mx = std::max(mx, lane_max[l]);
      }
    }
    if (nan) return lse_finish(mx, acc_t(0), true);
    acc_t sum = sum_ * std::exp(max_ - mx);
    if constexpr (std::is_same_v<acc_t, float>)
      for (int64_t l = 0; l < fVec::size(); ++l) sum += lane_sum[l] * std::exp(lane_max[l] - mx);
    return lse_finish(mx, sum, false);
  }

 private:
  template <typename T>
  void add_scalar_block(const T* z, int64_t begin, int64_t end) {
    acc_t next = max_;
    for (int64_t j = begin; j < end; ++j) {
      const acc_t x = acc_t(z[j]);
      nan_ |= std::isnan(x);
      next = std::max(next, x);
    }
    acc_t sum = sum_ * std::exp(max_ - next);
    for (int64_t j = begin; j < end; ++j) sum += std::exp(acc_t(z[j]) - next);
    sum_ = sum;
    max_ = next;
  }

  // The lowest finite value, not -inf, as the starting max: exp(x - max) then never sees
  // -inf - (-inf); a -inf or -finfo.max logit adds exactly 0 once any larger logit is seen.
  fVec vmax_{-FLT_MAX}, vsum_{0.0f}, vcarry_{0.0f};
  acc_t max_ = std::numeric_limits<acc_t>::lowest(), sum_ = 0;
  bool nan_ = false;
};

// LSE over the whole row, or over its text tokens: then the runs of whole blocks without a number
// id are read in place, and each block holding some is copied with those columns set to -inf, so
// that the pass stays vectorised however many and however scattered the number ids are.
template <typename scalar_t>
LogSumExp<acc_type<scalar_t>> dense_logsumexp(const scalar_t* z, int64_t V, int dense_kind,
                                              const std::vector<int64_t>& sorted_ids) {
  using acc_t = acc_type<scalar_t>;
  using Lse = RowLogSumExp<acc_t>;
  Lse lse;
  if (dense_kind != kDenseText) {
    lse.add(z, 0, V);
    return lse.result();
  }
  acc_t block[Lse::kBlock];
  auto id = sorted_ids.begin();
  int64_t i = 0;
  while (i < V) {
    const int64_t next_id = id == sorted_ids.end() ? V : *id;
    const int64_t clean_end = i + (next_id - i) / Lse::kBlock * Lse::kBlock;
    if (clean_end > i) {
      lse.add(z, i, clean_end);
      i = clean_end;
      continue;
    }
    const int64_t end = std::min(i + Lse::kBlock, V);  // holds next_id, or is the row's last block
    for (int64_t j = i; j < end; ++j) block[j - i] = acc_t(z[j]);
    for (; id != sorted_ids.end() && *id < end; ++id) block[*id - i] = -std::numeric_limits<acc_t>::infinity();
    lse.add(block, 0, end - i);
    i = end;
  }
  return lse.result();
}

// out_k = coef * exp(z_k - LSE_V) over the row (z and out may be the same buffer), formed as
// (coef / Σ) * exp(z_k - max): one exp and one multiply per element, shift-invariant.
template <typename scalar_t>
void row_scaled_softmax(const scalar_t* z, scalar_t* out, int64_t V, const LogSumExp<acc_type<scalar_t>>& lse,
                        acc_type<scalar_t> coef) {
  using acc_t = acc_type<scalar_t>;
  const acc_t scale = coef * std::exp(-lse.log_sum), mx = lse.max;
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const fVec vmax(mx), vscale(scale);
    for (; i + kStep <= V; i += kStep) {
      fVec a, b;
      load_step(z + i, a, b);
      store_step(out + i, vscale * (a - vmax).exp_u20(), vscale * (b - vmax).exp_u20());
    }
  }
  for (; i < V; ++i) out[i] = scalar_t(scale * std::exp(acc_t(z[i]) - mx));
}

// A row's number-token logits, gathered once into acc_t scratch (so that an in-place backward
// may overwrite the logits after reading them).
template <typename acc_t>
struct GatheredRow : NumberColumns {
  const acc_t* number_logits;

  acc_t logit(int64_t k) const { return number_logits[k]; }
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

// Rows per task: about 32K elements of work each (ATen's grain size). Every row is computed on
// its own, so the split never changes a result.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, int64_t(32768) / std::max<int64_t>(V, 1)); }

// The table as the row functions read it, its contents checked once per call: ids unique and in
// [0, V), number_index their inverse (-1 elsewhere), value_order a permutation that sorts the
// finite values, gaps finite and non-negative. K + V reads, next to the M x V logits.
struct CpuTable {
  const int64_t* ids;
  const int64_t* index;
  const float* values;
  const int64_t* order;
  const float* gaps;
  int64_t K;
  std::vector<int64_t> sorted_ids;  // the text tokens are the ranges between them
};

CpuTable checked_table(const RowsCall& call) {
  const TableTensors& table = call.table;
  const int64_t K = call.K, V = call.logits.size(1);
  CpuTable t{table.number_ids.const_data_ptr<int64_t>(), table.number_index.const_data_ptr<int64_t>(),
             table.number_values.const_data_ptr<float>(), table.value_order.const_data_ptr<int64_t>(),
             table.sorted_gaps.const_data_ptr<float>(), K, {}};
  t.sorted_ids.assign(t.ids, t.ids + K);
  std::sort(t.sorted_ids.begin(), t.sorted_ids.end());
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = t.sorted_ids[k];
    TORCH_CHECK(id >= 0 && id < V, "ntl_fast: number_ids holds ", id, ", outside the vocabulary [0, ", V, ")");
    TORCH_CHECK(k == 0 || id != t.sorted_ids[k - 1], "ntl_fast: number_ids holds ", id, " more than once");
    TORCH_CHECK(std::isfinite(t.values[k]), "ntl_fast: number_values[", k, "] is ", t.values[k],
                ", not a finite value");
  }
  for (int64_t v = 0; v < V; ++v) {
    const int64_t j = t.index[v];
    TORCH_CHECK(j == -1 || (j >= 0 && j < K && t.ids[j] == v), "ntl_fast: number_index[", v, "] = ", j,
                " does not match number_ids (it must give each id's position in number_ids, -1 elsewhere)");
  }
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(t.index[t.ids[k]] == k, "ntl_fast: number_index[", t.ids[k], "] = ", t.index[t.ids[k]],
                " but number_ids[", k, "] = ", t.ids[k]);
  std::vector<char> seen(K, 0);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t o = t.order[i];
    TORCH_CHECK(o >= 0 && o < K && !seen[o], "ntl_fast: value_order must be a permutation of 0..", K - 1,
                ", got ", o, " at position ", i);
    seen[o] = 1;
    if (i > 0)
      TORCH_CHECK(t.values[t.order[i - 1]] <= t.values[o], "ntl_fast: value_order must sort number_values ",
                  "ascending (position ", i, ")");
  }
  for (int64_t i = 0; i + 1 < K; ++i)
    TORCH_CHECK(std::isfinite(t.gaps[i]) && t.gaps[i] >= 0.0f, "ntl_fast: sorted_gaps[", i, "] is ", t.gaps[i],
                ", not a finite non-negative gap");
  return t;
}

// One thread's scratch: a row's gathered number logits (viewed by `row`) and its fixes; for
// bfloat16/float16 rows also the float32 exp(z - max) of the last row whose vocabulary LSE the
// forward took (`exps_row`, `exps_max`), which that row's backward then scales instead of
// converting and exponentiating the row a second time. The forward keeps them only once the
// scratch has served a backward (`keep_exps`): loss and gradient row by row, not a forward alone.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> number_logits, fix;
  GatheredRow<acc_t> row;
  std::vector<float> exps;
  const void* exps_row = nullptr;
  float exps_max = 0.0f;
  bool keep_exps = false;

  explicit RowScratch(const CpuTable& t)
      : number_logits(t.K), fix(t.K), row{{t.values, t.order, t.gaps, t.K}, number_logits.data()} {}
};

template <typename scalar_t>
constexpr bool kHalfWidth = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

// LSE over a whole bfloat16/float16 row whose gradient comes next, in two steps over it (the
// second from cache): its max, then exps[k] = exp(z_k - max), kept for the backward, and their
// sum. One exp per element over forward and backward, against two for RowLogSumExp then
// row_scaled_softmax. Same special values as RowLogSumExp: NaN anywhere gives NaN; -inf logits
// add 0.
template <typename scalar_t, typename acc_t>
LogSumExp<float> cached_logsumexp(const scalar_t* z, int64_t V, RowScratch<acc_t>& scratch) {
  scratch.exps_row = nullptr;
  if (int64_t(scratch.exps.size()) < V) scratch.exps.resize(V);
  float* e = scratch.exps.data();
  fVec vmax0(-FLT_MAX), vmax1(-FLT_MAX);
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) {
    fVec a, b;
    load_step(z + i, a, b);
    vmax0 = at::vec::maximum(vmax0, a);  // propagates NaN
    vmax1 = at::vec::maximum(vmax1, b);
  }
  float lanes[fVec::size()];
  at::vec::maximum(vmax0, vmax1).store(lanes);
  float mx = -FLT_MAX;
  bool nan = false;
  for (int64_t l = 0; l < fVec::size(); ++l) {
    nan |= std::isnan(lanes[l]);
    mx = std::max(mx, lanes[l]);
  }
  for (int64_t j = i; j < V; ++j) {
    const float x = float(z[j]);
    nan |= std::isnan(x);
    mx = std::max(mx, x);
  }
  if (nan) return lse_finish(mx, 0.0f, true);
  const fVec vmx(mx);
  fVec vsum0(0.0f), vsum1(0.0f), carry0(0.0f), carry1(0.0f);  // compensated, as in RowLogSumExp
  for (i = 0; i + kStep <= V; i += kStep) {
    fVec a, b;
    load_step(z + i, a, b);
    a = (a - vmx).exp_u20();
    b = (b - vmx).exp_u20();
    a.store(e + i);
    b.store(e + i + fVec::size());
    a = a - carry0;
    b = b - carry1;
    const fVec total0 = vsum0 + a, total1 = vsum1 + b;
    carry0 = (total0 - vsum0) - a;
    carry1 = (total1 - vsum1) - b;
    vsum0 = total0;
    vsum1 = total1;
  }
  ((vsum0 - carry0) + (vsum1 - carry1)).store(lanes);
  float sum = 0.0f;
  for (int64_t l = 0; l < fVec::size(); ++l) sum += lanes[l];
  for (int64_t j = i; j < V; ++j) sum += (e[j] = std::exp(float(z[j]) - mx));
  const LogSumExp<float> lse = lse_finish(mx, sum, false);
  if (lse.max == mx) {  // finite: the exps are the backward's
    scratch.exps_row = z;
    scratch.exps_max = mx;
  }
  return lse;
}

// out_k = coef * exp(z_k - LSE_V) from the cached exps of row z (see RowScratch).
template <typename scalar_t>
void row_scaled_exps(const float* e, scalar_t* out, int64_t V, const LogSumExp<float>& lse, float coef) {
  const float scale = coef * std::exp(-lse.log_sum);
  const fVec vscale(scale);
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep)
    store_step(out + i, vscale * fVec::loadu(e + i), vscale * fVec::loadu(e + i + fVec::size()));
  for (; i < V; ++i) out[i] = scalar_t(scale * e[i]);
}

// One row's losses and the statistics its backward needs.
template <typename acc_t>
struct RowLosses {
  acc_t ce, ntl;
  RowStats<acc_t> stats;
};

// The forward of row z (one read of it); gathers its number logits into the scratch.
template <typename scalar_t, typename acc_t>
RowLosses<acc_t> forward_row(const scalar_t* z, int64_t V, const RowLabel& lab, const CpuTable& table,
                             RowScratch<acc_t>& scratch, bool with_ce, const Options& opt) {
  const int dense_kind = dense_lse_kind(lab, with_ce, opt);
  LogSumExp<acc_t> dense{0, 0};
  scratch.exps_row = nullptr;
  // 16-bit rows whose backward follows: the exps kept for it; otherwise the online pass (faster
  // when nothing is kept)
  const bool keep = kHalfWidth<scalar_t> && dense_kind == kDenseVocab && scratch.keep_exps;
  if constexpr (kHalfWidth<scalar_t>) {
    if (keep) dense = cached_logsumexp(z, V, scratch);
  }
  if (dense_kind != kNoDense && !keep) dense = dense_logsumexp(z, V, dense_kind, table.sorted_ids);
  if (!lab.bad && lab.number >= 0) gather_number_logits(z, table.ids, table.K, V, scratch.number_logits.data());
  RowLosses<acc_t> out{0, 0, row_stats(scratch.row, lab, dense_kind, dense)};
  const acc_t z_label = lab.in_range ? acc_t(z[lab.label]) : acc_t(0);
  row_forward(scratch.row, lab, z_label, out.stats, with_ce, opt, &out.ce, &out.ntl);
  return out;
}

// Writes d(grad_ce·CE + grad_ntl·NTL)/dz of row z into o (which may be z itself: every value
// the fixes need is read before the dense write).
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* z, scalar_t* o, int64_t V, const RowLabel& lab, const CpuTable& table,
                  RowScratch<acc_t>& scratch, const RowStats<acc_t>& stats, acc_t grad_ce, acc_t grad_ntl,
                  bool with_ce, const Options& opt) {
  if (!lab.bad && lab.number >= 0) gather_number_logits(z, table.ids, table.K, V, scratch.number_logits.data());
  const acc_t z_label = lab.in_range ? acc_t(z[lab.label]) : acc_t(0);
  const RowGradient<acc_t> g =
      row_backward(scratch.row, lab, z_label, stats, grad_ce, grad_ntl, with_ce, opt, scratch.fix.data());
  bool cached = false;
  if constexpr (kHalfWidth<scalar_t>) {
    cached = g.coef != acc_t(0) && scratch.exps_row == static_cast<const void*>(z) &&
             stats.vocab.max == scratch.exps_max;
    if (cached) row_scaled_exps(scratch.exps.data(), o, V, stats.vocab, g.coef);
  }
  if (cached) {
    // written from the forward's exps above
  } else if (g.coef != acc_t(0)) {
    row_scaled_softmax(z, o, V, stats.vocab, g.coef);
  } else {
    std::fill(o, o + V, scalar_t(0));
  }
  if (g.number_fix)
    for (int64_t k = 0; k < table.K; ++k) o[table.ids[k]] = scalar_t(scratch.fix[k]);
  if (g.label_column >= 0) o[g.label_column] = scalar_t(g.label_fix);
  scratch.exps_row = nullptr;  // o may be z: the cache is this row's only until its gradient is written
  scratch.keep_exps = true;
}

// Calls `row(r, label, scratch)` for every row: rows split into tasks of about row_grain(V) rows,
// one scratch per task, each row's label read and classified. Every row is computed on its own,
// so the split never changes a result.
template <typename acc_t, typename RowFn>
void parallel_rows(const Tensor& labels, int64_t M, int64_t V, const CpuTable& table, const Options& opt,
                   const RowFn& row) {
  const void* label_data = labels.const_data_ptr();
  at::parallel_for(0, M, row_grain(V), [&](int64_t begin, int64_t end) {
    RowScratch<acc_t> scratch(table);
    for (int64_t r = begin; r < end; ++r)
      row(r, classify_label(read_label(labels, label_data, r), V, table.K, table.index, opt.ignore_index), scratch);
  });
}

// The forward of every row: ce (when with_ce), ntl and the saved statistics.
void forward_cpu(const Tensor& logits, const Tensor& labels, const CpuTable& table, const Options& opt, bool with_ce,
                 const Tensor& ce, const Tensor& ntl, const Tensor& row_stats) {
  const int64_t M = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    acc_t* ce_out = with_ce ? ce.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ntl_out = ntl.mutable_data_ptr<acc_t>();
    acc_t* stats_out = row_stats.mutable_data_ptr<acc_t>();
    parallel_rows<acc_t>(labels, M, V, table, opt, [&](int64_t r, const RowLabel& lab, RowScratch<acc_t>& scratch) {
      const RowLosses<acc_t> f = forward_row(z_all + r * V, V, lab, table, scratch, with_ce, opt);
      if (with_ce) ce_out[r] = f.ce;
      ntl_out[r] = f.ntl;
      f.stats.store(stats_out + r * RowStats<acc_t>::kSize);
    });
  });
}

// Writes d logits into `out` (which may be the logits themselves). grad_ce undefined: NTL only.
void backward_cpu(const Tensor& logits, const Tensor& labels, const CpuTable& table, const Options& opt,
                  const Tensor& row_stats, const Tensor& grad_ce, const Tensor& grad_ntl, const Tensor& out) {
  const bool with_ce = grad_ce.defined();
  const int64_t M = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    scalar_t* out_all = out.mutable_data_ptr<scalar_t>();
    const acc_t* g_ce = with_ce ? grad_ce.const_data_ptr<acc_t>() : nullptr;
    const acc_t* g_ntl = grad_ntl.const_data_ptr<acc_t>();
    const acc_t* stats = row_stats.const_data_ptr<acc_t>();
    parallel_rows<acc_t>(labels, M, V, table, opt, [&](int64_t r, const RowLabel& lab, RowScratch<acc_t>& scratch) {
      backward_row(z_all + r * V, out_all + r * V, V, lab, table, scratch,
                   RowStats<acc_t>::load(stats + r * RowStats<acc_t>::kSize), with_ce ? g_ce[r] : acc_t(0), g_ntl[r],
                   with_ce, opt);
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

// CE and NTL per row and d(Σ ce_scale·CE + Σ ntl_scale·NTL)/d logits into `grad` (which may be the
// logits themselves), each row's gradient written right after its forward while the row is still
// in cache: one read of the logits from memory and one write of the gradient.
void loss_and_grad_cpu(const Tensor& logits, const Tensor& labels, const CpuTable& table, const Options& opt,
                       const Tensor& ce_scale, const Tensor& ntl_scale, const Tensor& ce, const Tensor& ntl,
                       const Tensor& grad) {
  const int64_t M = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ntl_fast_loss_and_grad_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
    scalar_t* grad_all = grad.mutable_data_ptr<scalar_t>();
    const acc_t* g_ce = ce_scale.const_data_ptr<acc_t>();
    const acc_t* g_ntl = ntl_scale.const_data_ptr<acc_t>();
    acc_t* ce_out = ce.mutable_data_ptr<acc_t>();
    acc_t* ntl_out = ntl.mutable_data_ptr<acc_t>();
    parallel_rows<acc_t>(labels, M, V, table, opt, [&](int64_t r, const RowLabel& lab, RowScratch<acc_t>& scratch) {
      const scalar_t* z = z_all + r * V;
      const RowLosses<acc_t> f = forward_row(z, V, lab, table, scratch, true, opt);
      ce_out[r] = f.ce;
      ntl_out[r] = f.ntl;
      backward_row(z, grad_all + r * V, V, lab, table, scratch, f.stats, g_ce[r], g_ntl[r], true, opt);
    });
  });
}

// The CPU kernels behind the operators of csrc/ntl_ops.h.
struct CpuKernels {
  using Guard = NoDeviceGuard;

  static void check(const RowsCall& call) {
    TORCH_CHECK(call.logits.device().is_cpu(), "ntl_fast: CPU kernel called with ", call.logits.device(),
                " tensors");
  }
  static void forward(const RowsCall& call, bool with_ce, const Tensor& ce, const Tensor& ntl,
                      const Tensor& row_stats) {
    forward_cpu(call.logits, call.labels, checked_table(call), call.options, with_ce, ce, ntl, row_stats);
  }
  static void backward(const RowsCall& call, const Tensor& row_stats, const Tensor& grad_ce, const Tensor& grad_ntl,
                       const Tensor& out) {
    backward_cpu(call.logits, call.labels, checked_table(call), call.options, row_stats, grad_ce, grad_ntl, out);
  }
  static void loss_and_grad(const RowsCall& call, const Tensor& ce_scale, const Tensor& ntl_scale, const Tensor& ce,
                            const Tensor& ntl, const Tensor& grad) {
    loss_and_grad_cpu(call.logits, call.labels, checked_table(call), call.options, ce_scale, ntl_scale, ce, ntl,
                      grad);
  }
  static Tensor new_gradient(const Tensor& logits) {
    Tensor grad = at::empty_like(logits);
    advise_huge_pages(grad);
    return grad;
  }
  // The usual grad_output of 1 costs nothing; reading it on the host is free for CPU tensors.
  static void scale_gradient(const Tensor& grad, const Tensor& grad_output) {
    if (grad_output.item<double>() != 1.0) grad.mul_(grad_output);
  }
};

}  // namespace
}  // namespace ntl

TORCH_LIBRARY_IMPL(ntl_fast, CPU, m) { ntl::Operators<ntl::CpuKernels>::register_all(m); }
