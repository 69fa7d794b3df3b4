// The per-row Number Token Loss math of docs/math.md §2, shared by the CPU kernels and the CUDA kernels.
//
// Torch-free on purpose: nvcc compiles it in a .cu file without any PyTorch header. The kernels
// do the dense work over the vocabulary (log-sum-exp, writing the gradient); everything that
// touches only the K number-token columns lives here, once.
//
// A "row" (a NumberColumns plus logit(k)) gives access to one position's number-token logits and
// to the value table:
//   K, logit(k) (NaN when number_ids[k] is outside the vocabulary), value(k),
//   sorted(i) (position in N of the i-th smallest value, -1 when out of range), gap(i).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define NTL_HD __host__ __device__ __forceinline__
#else
#define NTL_HD inline
#endif

namespace ntl {

enum LossKind : int { kWas = 0, kMse = 1, kMae = 2, kHuber = 3, kWasCdf = 4 };

// The value side of a row, the same for every row of a call: each kernel's row type derives from
// it and adds K logit(k) of its own (read in place, or gathered first).
struct NumberColumns {
  const float* values;
  const int64_t* order;
  const float* gaps;
  int64_t K;

  NTL_HD float value(int64_t k) const { return values[k]; }
  NTL_HD int64_t sorted(int64_t i) const {
    const int64_t o = order[i];
    return (o >= 0 && o < K) ? o : -1;
  }
  NTL_HD float gap(int64_t i) const { return gaps[i]; }
};

// The per-call switches (ntl_fast.config.LossConfig) plus the table's host constants.
struct Options {
  int loss;
  bool squash;
  double squash_min;    // d_min of §2.2
  double squash_scale;  // (s - 1) / (d_max - d_min), 0 when d_max == d_min
  bool reweigh;
  double reweigh_constant;  // c of §2.4
  bool gaussian;            // Gaussian targets (§2.5) for CE and for was_cdf
  double sigma;
  int64_t ignore_index;
};

NTL_HD float ntl_exp(float x) { return expf(x); }
NTL_HD double ntl_exp(double x) { return exp(x); }
NTL_HD float ntl_log(float x) { return logf(x); }
NTL_HD double ntl_log(double x) { return log(x); }
NTL_HD float ntl_abs(float x) { return fabsf(x); }
NTL_HD double ntl_abs(double x) { return fabs(x); }

template <typename acc_t>
NTL_HD acc_t ntl_sign(acc_t x) {
  return acc_t((x > acc_t(0)) - (x < acc_t(0)));  // 0 at 0, like torch.sign / the gradient of abs
}

template <typename acc_t>
NTL_HD acc_t ntl_nan() {
  return acc_t(NAN);
}

NTL_HD float ntl_max(float a, float b) { return fmaxf(a, b); }
NTL_HD double ntl_max(double a, double b) { return fmax(a, b); }

// A log-sum-exp kept in two parts, LSE = max + log_sum with log_sum = log Σ exp(x - max) in
// [0, log n]. Every probability is formed as exp((x - max) - log_sum): x - max is exact for the
// x that matter (those near the max), so probabilities keep full relative precision whatever
// constant the row is shifted by, where exp(x - LSE) with LSE rounded to the accumulation type
// would lose |LSE| * eps of it (docs/math.md §4). An empty set (or all -inf) is {-inf, 0}.
template <typename acc_t>
struct LogSumExp {
  acc_t max;
  acc_t log_sum;
};

// exp(x - LSE), shift-invariant.
template <typename acc_t>
NTL_HD acc_t lse_prob(acc_t x, const LogSumExp<acc_t>& lse) {
  return ntl_exp((x - lse.max) - lse.log_sum);
}

// LSE - x, shift-invariant (a cross-entropy term).
template <typename acc_t>
NTL_HD acc_t lse_minus(const LogSumExp<acc_t>& lse, acc_t x) {
  return (lse.max - x) + lse.log_sum;
}

// log(exp(part) / exp(whole)) of a subset's LSE against its superset's: its log probability mass.
template <typename acc_t>
NTL_HD acc_t lse_log_share(const LogSumExp<acc_t>& part, const LogSumExp<acc_t>& whole) {
  return (part.max - whole.max) + (part.log_sum - whole.log_sum);
}

// The LSE of the union of two disjoint sets.
template <typename acc_t>
NTL_HD LogSumExp<acc_t> lse_union(const LogSumExp<acc_t>& a, const LogSumExp<acc_t>& b) {
  if (a.max != a.max || b.max != b.max) return {ntl_nan<acc_t>(), ntl_nan<acc_t>()};
  if (a.max == acc_t(-INFINITY)) return b;  // exact: m is 1 to the last bit when the text is all -inf
  if (b.max == acc_t(-INFINITY)) return a;
  const acc_t mx = ntl_max(a.max, b.max);
  const acc_t sum = ntl_exp((a.max - mx) + a.log_sum) + ntl_exp((b.max - mx) + b.log_sum);
  return {mx, ntl_log(sum)};
}

// Turns a running (max, Σ exp(x - max)) into a LogSumExp. NaN logits (nan) and +inf ones (which
// make the sum NaN) give NaN.
template <typename acc_t>
NTL_HD LogSumExp<acc_t> lse_finish(acc_t mx, acc_t sum, bool nan) {
  if (nan || sum != sum) return {ntl_nan<acc_t>(), ntl_nan<acc_t>()};
  if (!(sum > acc_t(0))) return {acc_t(-INFINITY), acc_t(0)};  // nothing above -inf
  return {mx, ntl_log(sum)};
}

// What the forward of one row saves for its backward, kSize accumulation-type values per row.
template <typename acc_t>
struct RowStats {
  static constexpr int kSize = 5;
  LogSumExp<acc_t> vocab;   // LSE_V (computed only where CE or the reweighing needs it)
  LogSumExp<acc_t> number;  // LSE_N (NTL-valid rows only)
  acc_t text_log_mass;      // log(1 - m) = LSE_{V∖N} - LSE_V (reweighed NTL-valid rows only)

  // log m = LSE_N - LSE_V.
  NTL_HD acc_t number_log_mass() const { return lse_log_share(number, vocab); }

  NTL_HD void store(acc_t* out) const {
    out[0] = vocab.max;
    out[1] = vocab.log_sum;
    out[2] = number.max;
    out[3] = number.log_sum;
    out[4] = text_log_mass;
  }
  NTL_HD static RowStats load(const acc_t* in) { return {{in[0], in[1]}, {in[2], in[3]}, in[4]}; }
};

// How a label classifies its row (docs/math.md §2): counts for CE iff in_range (in [0, V) and not
// ignore_index); NTL-valid iff number >= 0.
struct RowLabel {
  int64_t label;
  int64_t number;  // position of the label in N, -1 when it is not a number token
  bool in_range;   // 0 <= label < V and label != ignore_index
  bool bad;        // neither in range nor ignore_index: NaN losses, zero gradient
};

// Every label-indexed read is bounds-checked here: a bad label never reaches number_index.
NTL_HD RowLabel classify_label(int64_t label, int64_t V, int64_t K, const int64_t* number_index,
                               int64_t ignore_index) {
  RowLabel r{label, -1, false, false};
  if (label == ignore_index) return r;  // ignored, even when ignore_index lies inside [0, V)
  r.in_range = label >= 0 && label < V;
  if (!r.in_range) {
    r.bad = true;
    return r;
  }
  const int64_t j = number_index[label];
  if (j >= K || j < -1) {
    r.bad = true;  // a corrupt table: poison the row instead of reading out of bounds
  } else {
    r.number = j;
  }
  return r;
}

// q_j = exp(z_j - LSE_N)
template <typename acc_t, typename Row>
NTL_HD acc_t number_prob(const Row& row, int64_t k, const LogSumExp<acc_t>& lse_number) {
  return lse_prob(acc_t(row.logit(k)), lse_number);
}

// LSE_N = log Σ_{j∈N} exp(z_j)
template <typename acc_t, typename Row>
NTL_HD LogSumExp<acc_t> number_logsumexp(const Row& row) {
  acc_t mx = -INFINITY;
  bool nan = false;
  for (int64_t k = 0; k < row.K; ++k) {
    const acc_t z = row.logit(k);
    nan |= z != z;
    mx = z > mx ? z : mx;
  }
  if (nan || mx == acc_t(-INFINITY)) return lse_finish(mx, acc_t(0), nan);
  acc_t sum = 0;
  for (int64_t k = 0; k < row.K; ++k) sum += ntl_exp(row.logit(k) - mx);
  return lse_finish(mx, sum, false);
}

// Which dense log-sum-exp a row's forward needs: none, over the whole vocabulary (CE), or over
// the text tokens V∖N only (reweighed NTL-valid rows, with or without CE: there LSE_V is the
// union of LSE_{V∖N} and LSE_N, so that 1 - m = exp(LSE_{V∖N} - LSE_V) is formed from the text
// tokens' own sum and never as 1 - m, which cancels when m is 1 to the last bits).
enum DenseLse : int { kNoDense = 0, kDenseVocab = 1, kDenseText = 2 };

NTL_HD int dense_lse_kind(const RowLabel& lab, bool with_ce, const Options& opt) {
  if (lab.bad) return kNoDense;
  if (opt.reweigh && lab.number >= 0) return kDenseText;
  return (with_ce && lab.in_range) ? kDenseVocab : kNoDense;
}

// A row's saved statistics from its dense log-sum-exp (of the kind dense_lse_kind says) and, for an
// NTL-valid row, LSE_N (number_logsumexp; the one-pass CUDA kernel has it from its terms kernel).
template <typename acc_t>
NTL_HD RowStats<acc_t> row_stats_with_number(const RowLabel& lab, int dense_kind, const LogSumExp<acc_t>& dense,
                                             const LogSumExp<acc_t>& number) {
  RowStats<acc_t> st{{0, 0}, {0, 0}, 0};
  if (lab.bad) return st;
  if (lab.number >= 0) st.number = number;
  if (dense_kind == kDenseText) {
    st.vocab = lse_union(dense, st.number);
    st.text_log_mass = lse_log_share(dense, st.vocab);
  } else if (dense_kind == kDenseVocab) {
    st.vocab = dense;
  }
  return st;
}

template <typename acc_t, typename Row>
NTL_HD RowStats<acc_t> row_stats(const Row& row, const RowLabel& lab, int dense_kind,
                                 const LogSumExp<acc_t>& dense) {
  LogSumExp<acc_t> number{0, 0};
  if (!lab.bad && lab.number >= 0) number = number_logsumexp<acc_t>(row);
  return row_stats_with_number(lab, dense_kind, dense, number);
}

// D(y, v_k) of §2.2, squashed onto [1, s] when asked; float32 like the table's distance matrix.
template <typename acc_t, typename Row>
NTL_HD acc_t label_distance(const Row& row, int64_t k, int64_t label_number, const Options& opt) {
  const float d = fabsf(float(row.value(label_number)) - float(row.value(k)));
  if (!opt.squash) return acc_t(d);
  if (!(d > 0.0f)) return acc_t(0);
  return acc_t(1.0f + (d - float(opt.squash_min)) * float(opt.squash_scale));
}

// The exponent -½((v_k - y)/σ)² of the Gaussian target (§2.5).
template <typename acc_t, typename Row>
NTL_HD acc_t gaussian_exponent(const Row& row, int64_t k, acc_t y, const Options& opt) {
  const acc_t u = (acc_t(row.value(k)) - y) / acc_t(opt.sigma);
  return acc_t(-0.5) * u * u;
}

// log Σ_k exp(exponent_k): the Gaussian target's normaliser (the largest exponent is 0, at y).
template <typename acc_t, typename Row>
NTL_HD acc_t gaussian_log_norm(const Row& row, acc_t y, const Options& opt) {
  acc_t sum = 0;
  for (int64_t k = 0; k < row.K; ++k) sum += ntl_exp(gaussian_exponent(row, k, y, opt));
  return ntl_log(sum);
}

// t_k: one-hot at the label (opt.gaussian false) or the Gaussian target over N.
template <typename acc_t, typename Row>
NTL_HD acc_t number_target(const Row& row, int64_t k, int64_t label_number, acc_t y, acc_t log_norm,
                           bool gaussian, const Options& opt) {
  if (gaussian) return ntl_exp(gaussian_exponent(row, k, y, opt) - log_norm);
  return k == label_number ? acc_t(1) : acc_t(0);
}

// A compensated (Kahan) running sum: its rounding error stays about eps times the terms' total
// magnitude however many terms it takes.
template <typename acc_t>
struct KahanSum {
  acc_t sum = 0, carry = 0;
  NTL_HD void add(acc_t x) {
    const acc_t term = x - carry;
    const acc_t next = sum + term;
    carry = (next - sum) - term;
    sum = next;
  }
};

// The CDF differences D_i = F_q(i) - F_t(i) of §2.3 at the ranks i = 0..K-1 (by value), in order.
// Each is summed from its shorter side: the prefix Σ_{j<=i} (q_j - t_j) below the split rank, the
// negated suffix -Σ_{j>i} (q_j - t_j) from it on (equal, as q and t both sum to 1), the split being
// the first rank whose suffix holds less than half the mass of q + t. Either sum's rounding error
// is eps times its own mass, so a confident prediction keeps the relative precision of its small
// differences, where F_q(i) - 1 would be rounding noise of 1.
template <typename acc_t, typename Row>
struct CdfWalk {
  const Row& row;
  const LogSumExp<acc_t>& lse_number;
  int64_t label_number;
  acc_t y, log_norm;
  const Options& opt;
  int64_t split = 0;
  acc_t split_suffix = 0;  // Σ_{j>split} (q_j - t_j)
  bool complete = true;    // false when value_order names a position outside N
  int64_t rank = -1;
  KahanSum<acc_t> prefix, suffix;  // compensated: K ~ 1000 steps each

  NTL_HD CdfWalk(const Row& r, const LogSumExp<acc_t>& lse, int64_t label, acc_t y_, acc_t norm, const Options& o)
      : row(r), lse_number(lse), label_number(label), y(y_), log_norm(norm), opt(o) {
    acc_t mass = 0;
    KahanSum<acc_t> sum;
    for (int64_t i = row.K - 1; i > 0; --i) {  // adds rank i to the suffix of rank i - 1
      acc_t q, t;
      probabilities(i, &q, &t);
      mass += q + t;
      if (mass >= acc_t(1)) {
        split = i;
        split_suffix = sum.sum;
        return;
      }
      sum.add(q - t);
    }
    split_suffix = sum.sum;
  }

  // q and t of the token at rank i (0 for a position outside N; see complete).
  NTL_HD int64_t probabilities(int64_t i, acc_t* q, acc_t* t) {
    const int64_t o = row.sorted(i);
    if (o < 0) {
      complete = false;
      *q = *t = 0;
      return o;
    }
    *q = number_prob(row, o, lse_number);
    *t = number_target(row, o, label_number, y, log_norm, opt.gaussian, opt);
    return o;
  }

  // Moves to the next rank: its token's position in N (-1 outside), q, and D at that rank.
  NTL_HD int64_t next(acc_t* q, acc_t* diff) {
    ++rank;
    acc_t t;
    const int64_t o = probabilities(rank, q, &t);
    if (rank < split) {
      prefix.add(*q - t);
      *diff = prefix.sum;
    } else {
      if (rank == split) {
        suffix.sum = split_suffix;
      } else {
        suffix.add(t - *q);
      }
      *diff = -suffix.sum;
    }
    return o;
  }
};

// f(d) and f'(d) of §2.1.
template <typename acc_t>
NTL_HD acc_t regression_value(acc_t d, int loss) {
  if (loss == kMse) return d * d;
  if (loss == kMae) return ntl_abs(d);
  const acc_t a = ntl_abs(d);
  return a < acc_t(1) ? acc_t(0.5) * d * d : a - acc_t(0.5);
}

template <typename acc_t>
NTL_HD acc_t regression_slope(acc_t d, int loss) {
  if (loss == kMse) return acc_t(2) * d;
  if (loss == kMae) return ntl_sign(d);
  return ntl_abs(d) < acc_t(1) ? d : ntl_sign(d);
}

// Σ_k q_k (x_k - c), compensated (Kahan): with c near E_q[x] its terms cancel.
template <typename acc_t, typename Row, typename X>
NTL_HD acc_t centred_expectation(const Row& row, const LogSumExp<acc_t>& lse_number, const X& x, acc_t c) {
  acc_t sum = 0, carry = 0;
  for (int64_t k = 0; k < row.K; ++k) {
    const acc_t term = number_prob(row, k, lse_number) * (x(k) - c) - carry;
    const acc_t next = sum + term;
    carry = (next - sum) - term;
    sum = next;
  }
  return sum;
}

// E_q[x] as a rounded centre plus a residual Σ_k q_k (x_k - centre), so that x_k - E_q[x] is
// formed as (x_k - centre) - residual. The computed q carry a common relative error (the
// rounding of their normaliser) that scales Σ q_k (x_k - c) by 1 + δ: with c the centre itself that
// sum is the tiny residual, so neither the loss E_q[x] - y nor a gradient q_k (x_k - E_q[x]) is
// rounding noise of |x| when it is small (a confident prediction, or ŷ near y over 0-999).
// The first centre is x at the most probable token, already close when q is nearly one-hot.
template <typename acc_t, typename Row, typename X>
NTL_HD void expectation(const Row& row, const LogSumExp<acc_t>& lse_number, const X& x, int64_t mode,
                        acc_t* centre, acc_t* residual) {
  const acc_t first = x(mode);
  *centre = first + centred_expectation(row, lse_number, x, first);
  *residual = centred_expectation(row, lse_number, x, *centre);
}

template <typename acc_t, typename Row>
struct NumberValue {  // x = v (regression losses)
  const Row& row;
  NTL_HD acc_t operator()(int64_t k) const { return acc_t(row.value(k)); }
};

template <typename acc_t, typename Row>
struct LabelDistance {  // x = D(y, v) (WAS)
  const Row& row;
  int64_t label_number;
  const Options& opt;
  NTL_HD acc_t operator()(int64_t k) const { return label_distance<acc_t>(row, k, label_number, opt); }
};

// The most probable number token (the first of the largest logits; 0 when a logit is NaN).
template <typename acc_t, typename Row>
NTL_HD int64_t number_mode(const Row& row) {
  int64_t mode = 0;
  acc_t best = row.logit(0);
  for (int64_t k = 1; k < row.K; ++k) {
    const acc_t z = row.logit(k);
    if (z > best) {
      best = z;
      mode = k;
    }
  }
  return mode;
}

// What the loss of one NTL-valid row needs to be differentiated (before reweighing). Every
// variant's gradient is q_k (x_k - E_q[x]) (x: v for the regression losses, D(y, v) for WAS, a
// for was_cdf), formed from E_q[x] = centre + residual (expectation above).
template <typename acc_t>
struct NumberStats {
  acc_t loss;       // L of §2.1-2.3
  acc_t y;          // the label's value
  acc_t centre;     // E_q[x], rounded
  acc_t residual;   // Σ_k q_k (x_k - centre)
  acc_t slope;      // f'(ŷ - y) (regression losses)
  acc_t log_norm;   // Gaussian target normaliser (was_cdf with Gaussian targets)
  acc_t cdf_total;  // a of the smallest value: Σ_k sign(F_q(k) - F_t(k)) gap_k (was_cdf)
};

template <typename acc_t, typename Row>
NTL_HD NumberStats<acc_t> number_stats(const Row& row, int64_t label_number, const LogSumExp<acc_t>& lse_number,
                                       const Options& opt, bool for_gradient) {
  NumberStats<acc_t> s{0, 0, 0, 0, 0, 0, 0};
  s.y = acc_t(row.value(label_number));
  if (opt.loss == kWas) {
    const LabelDistance<acc_t, Row> distance{row, label_number, opt};
    expectation(row, lse_number, distance, number_mode<acc_t>(row), &s.centre, &s.residual);
    s.loss = s.centre + s.residual;
  } else if (opt.loss == kWasCdf) {
    // W1 in CDF form, tokens sorted by value (§2.3): Σ_i |F_q(i) - F_t(i)| gap_i.
    if (opt.gaussian) s.log_norm = gaussian_log_norm(row, s.y, opt);
    CdfWalk<acc_t, Row> walk(row, lse_number, label_number, s.y, s.log_norm, opt);
    KahanSum<acc_t> loss;
    for (int64_t i = 0; i + 1 < row.K; ++i) {
      acc_t q, diff;
      walk.next(&q, &diff);
      const acc_t gap = acc_t(row.gap(i));
      loss.add(ntl_abs(diff) * gap);
      s.cdf_total += ntl_sign(diff) * gap;
    }
    s.loss = loss.sum;
    if (!walk.complete) {
      s.loss = ntl_nan<acc_t>();
      return s;
    }
    if (for_gradient) {
      // a at rank i = Σ_{k>=i} sign(D_k) gap_k, from the same differences as above; E_q[a] as in
      // expectation(): a at the most probable token, then two compensated centred sums.
      const int64_t mode = number_mode<acc_t>(row);
      acc_t centre = 0;
      for (int pass = 0; pass < 3; ++pass) {
        CdfWalk<acc_t, Row> again(row, lse_number, label_number, s.y, s.log_norm, opt);
        acc_t a = s.cdf_total, sum = 0, carry = 0;
        for (int64_t i = 0; i < row.K; ++i) {
          acc_t q, diff;
          const int64_t o = again.next(&q, &diff);
          if (pass == 0 && o == mode) centre = a;
          if (pass > 0) {
            const acc_t term = q * (a - centre) - carry;
            const acc_t next = sum + term;
            carry = (next - sum) - term;
            sum = next;
          }
          if (i + 1 < row.K) a -= ntl_sign(diff) * acc_t(row.gap(i));
        }
        if (pass == 1) centre += sum;
        if (pass == 2) s.residual = sum;
      }
      s.centre = centre;
    }
  } else {
    // ŷ - y = (centre - y) + residual.
    const NumberValue<acc_t, Row> value{row};
    expectation(row, lse_number, value, number_mode<acc_t>(row), &s.centre, &s.residual);
    const acc_t d = (s.centre - s.y) + s.residual;
    s.loss = regression_value(d, opt.loss);
    s.slope = regression_slope(d, opt.loss);
  }
  return s;
}

// Calls emit(k, ∂L/∂z_k) for every number token k (before reweighing), q_k (x_k - E_q[x]) as
//   WAS q_k (D_k - L); regression f'(ŷ - y) q_k (v_k - ŷ); was_cdf q_k (a_k - Σ_i q_i a_i).
template <typename acc_t, typename Row, typename Emit>
NTL_HD void number_gradients(const Row& row, int64_t label_number, const LogSumExp<acc_t>& lse_number,
                             const Options& opt, const NumberStats<acc_t>& s, Emit& emit) {
  if (opt.loss == kWas) {
    for (int64_t k = 0; k < row.K; ++k) {
      const acc_t q = number_prob(row, k, lse_number);
      emit(k, q * ((label_distance<acc_t>(row, k, label_number, opt) - s.centre) - s.residual));
    }
  } else if (opt.loss == kWasCdf) {
    CdfWalk<acc_t, Row> walk(row, lse_number, label_number, s.y, s.log_norm, opt);
    acc_t a = s.cdf_total;
    for (int64_t i = 0; i < row.K; ++i) {
      acc_t q, diff;
      const int64_t o = walk.next(&q, &diff);
      if (o >= 0) emit(o, q * ((a - s.centre) - s.residual));
      if (i + 1 < row.K) a -= ntl_sign(diff) * acc_t(row.gap(i));
    }
  } else {
    for (int64_t k = 0; k < row.K; ++k) {
      const acc_t q = number_prob(row, k, lse_number);
      emit(k, s.slope * q * ((acc_t(row.value(k)) - s.centre) - s.residual));
    }
  }
}

// g * x, exactly 0 when g is: a row whose upstream gradient is 0 (zero weight) gets a zero
// gradient even where its logits make x non-finite.
template <typename acc_t>
NTL_HD acc_t scaled(acc_t g, acc_t x) {
  return g == acc_t(0) ? acc_t(0) : g * x;
}

// The gradient of one row, in the form the kernels write it:
//   every column k: coef * p_k, then each number column ids[k] overwritten by fix[k] (on CUDA only
//   by the k that number_index names for it: one writer per column even when a table given to a
//   raw operator repeats an id) and the label column (when it is not a number token) by
//   label_fix. Both fixes are
//   computed in acc_t from the logits before the dense write, so the dense write may overwrite
//   the logits (in place).
template <typename acc_t>
struct RowGradient {
  acc_t coef;       // multiplies p_k = exp(z_k - LSE_V) on every column; 0 writes zeros
  acc_t label_fix;  // the label column's gradient, when label_column >= 0
  int64_t label_column;
  bool number_fix;  // fix[0..K) holds the number columns' gradients
};

template <typename acc_t, typename Row>
struct NumberColumnGradient {
  const Row& row;
  acc_t* fix;
  acc_t grad_ce, grad_ntl, mass, text_mass, loss_minus_c, y, log_norm;
  const LogSumExp<acc_t>& lse_vocab;
  int64_t label_number;
  bool need_p, reweigh, gaussian_ce;
  const Options& opt;

  // ∂/∂z_k of grad_ce·CE + grad_ntl·NTL for a number token k, given ∂L/∂z_k before reweighing.
  NTL_HD void operator()(int64_t k, acc_t dloss) {
    const acc_t p = need_p ? lse_prob(acc_t(row.logit(k)), lse_vocab) : acc_t(0);
    acc_t g = dloss;
    if (reweigh) g = mass * dloss + loss_minus_c * p * text_mass;
    acc_t value = scaled(grad_ntl, g);
    if (grad_ce != acc_t(0))
      value += grad_ce * (p - number_target(row, k, label_number, y, log_norm, gaussian_ce, opt));
    fix[k] = value;
  }
};

// One row's losses and gradient, in two stages: the CPU operators run both for a row at a time;
// the CUDA kernels run the first in a per-row kernel and the second after their dense pass.
//   Stage 1 (ForwardTerms, or number_gradient_terms for a backward) needs only the number
//   logits and LSE_N (no LSE_V): L before reweighing, the Gaussian normaliser and, for a backward,
//   ∂L/∂z_k before reweighing for every number token into dloss[0..K).
//   Stage 2 (row_forward_finish, row_backward_finish) forms the losses, or the RowGradient and its
//   fixes, from those and the row statistics.
template <typename acc_t>
struct NumberGradientTerms {
  acc_t loss;      // L before reweighing
  acc_t y;         // the label's value
  acc_t log_norm;  // the Gaussian target's normaliser (CE with Gaussian targets), else 0
  LogSumExp<acc_t> number;  // LSE_N

  // What row_forward_finish asks of its terms (ForwardTerms computes them where it asks).
  NTL_HD acc_t loss_before_reweighing() const { return loss; }
  NTL_HD acc_t label_value() const { return y; }
  NTL_HD acc_t ce_log_norm() const { return log_norm; }
};

template <typename acc_t>
struct StoreNumberGradient {
  acc_t* dloss;
  NTL_HD void operator()(int64_t k, acc_t d) { dloss[k] = d; }
};

template <typename acc_t, typename Row>
NTL_HD NumberGradientTerms<acc_t> number_terms(const Row& row, const NumberStats<acc_t>& s,
                                               const LogSumExp<acc_t>& lse_number, bool with_ce, const Options& opt) {
  const acc_t log_norm = (with_ce && opt.gaussian) ? gaussian_log_norm(row, s.y, opt) : acc_t(0);
  return {s.loss, s.y, log_norm, lse_number};
}

// Stage 1 of a backward (an NTL-valid row).
template <typename acc_t, typename Row>
NTL_HD NumberGradientTerms<acc_t> number_gradient_terms(const Row& row, int64_t label_number,
                                                        const LogSumExp<acc_t>& lse_number, bool with_ce,
                                                        const Options& opt, acc_t* dloss) {
  for (int64_t k = 0; k < row.K; ++k) dloss[k] = acc_t(0);  // positions a corrupt value_order misses
  const NumberStats<acc_t> s = number_stats(row, label_number, lse_number, opt, true);
  StoreNumberGradient<acc_t> store{dloss};
  number_gradients(row, label_number, lse_number, opt, s, store);
  return number_terms(row, s, lse_number, with_ce, opt);
}

// Stage 1 of a forward (an NTL-valid row), each term computed where row_forward_finish asks for it
// (Gaussian normaliser only for the CE) rather than all up front.
template <typename acc_t, typename Row>
struct ForwardTerms {
  const Row& row;
  int64_t label_number;
  const LogSumExp<acc_t>& lse_number;
  const Options& opt;
  NTL_HD acc_t loss_before_reweighing() const {
    return number_stats(row, label_number, lse_number, opt, false).loss;
  }
  NTL_HD acc_t label_value() const { return acc_t(row.value(label_number)); }
  NTL_HD acc_t ce_log_norm() const { return gaussian_log_norm(row, label_value(), opt); }
};

// Stage 2 of a forward: CE (§2.6, or Gaussian-CE §2.5) and NTL (reweighed per §2.4 when asked).
// `terms` (NumberGradientTerms or ForwardTerms) is read only for NTL-valid rows; z_label only when
// with_ce and in range.
template <typename acc_t, typename Row, typename Terms>
NTL_HD void row_forward_finish(const Row& row, const RowLabel& lab, acc_t z_label, const RowStats<acc_t>& st,
                               const Terms& terms, bool with_ce, const Options& opt, acc_t* ce, acc_t* ntl) {
  *ce = 0;
  *ntl = 0;
  if (lab.bad) {
    *ce = ntl_nan<acc_t>();
    *ntl = ntl_nan<acc_t>();
    return;
  }
  if (lab.number >= 0) {
    acc_t loss = terms.loss_before_reweighing();
    if (opt.reweigh) {
      const acc_t mass = ntl_exp(st.number_log_mass());
      loss = mass * loss + acc_t(opt.reweigh_constant) * ntl_exp(st.text_log_mass);
    }
    *ntl = loss;
  }
  if (with_ce && lab.in_range) {
    if (opt.gaussian && lab.number >= 0) {
      // LSE_V - Σ t_k z_k = Σ t_k (LSE_V - z_k) as the targets sum to 1: no rounded LSE_V.
      const acc_t y = terms.label_value();
      const acc_t log_norm = terms.ce_log_norm();
      acc_t ce_sum = 0;
      for (int64_t k = 0; k < row.K; ++k) {
        const acc_t t = number_target(row, k, lab.number, y, log_norm, true, opt);
        ce_sum += t * lse_minus(st.vocab, acc_t(row.logit(k)));
      }
      *ce = ce_sum;
    } else {
      *ce = lse_minus(st.vocab, z_label);
    }
  }
}

// Stage 2 of a backward: `terms` and `dloss` from number_gradient_terms (read only for NTL-valid
// rows). dloss may be fix itself: each dloss[k] is read just before fix[k] is written. The fixes
// k = k_first, k_first + k_step, ... are written (all of them by default; a CUDA block splits them
// over its threads, each of which forms the same RowGradient).
template <typename acc_t, typename Row>
NTL_HD RowGradient<acc_t> row_backward_finish(const Row& row, const RowLabel& lab, acc_t z_label,
                                              const RowStats<acc_t>& st, acc_t grad_ce, acc_t grad_ntl,
                                              bool with_ce, const Options& opt,
                                              const NumberGradientTerms<acc_t>& terms, const acc_t* dloss,
                                              acc_t* fix, int64_t k_first = 0, int64_t k_step = 1) {
  RowGradient<acc_t> r{0, 0, -1, false};
  if (lab.bad) return r;  // the losses are NaN constants there: zero gradient, like torch.where
  grad_ce = (with_ce && lab.in_range) ? grad_ce : acc_t(0);
  r.coef = grad_ce;
  if (lab.number >= 0) {
    acc_t mass = 1, text_mass = 0;
    if (opt.reweigh) {
      mass = ntl_exp(st.number_log_mass());
      text_mass = ntl_exp(st.text_log_mass);
      // ∂L'/∂z_k ⊇ (L - c) p_k (1[k∈N] - m): the -m part reaches every column.
      r.coef -= scaled(grad_ntl, (terms.loss - acc_t(opt.reweigh_constant)) * mass);
    }
    NumberColumnGradient<acc_t, Row> emit{row, fix, grad_ce, grad_ntl, mass, text_mass,
                                          terms.loss - acc_t(opt.reweigh_constant), terms.y, terms.log_norm,
                                          st.vocab, lab.number, with_ce || opt.reweigh, opt.reweigh,
                                          with_ce && opt.gaussian, opt};
    for (int64_t k = k_first; k < row.K; k += k_step) emit(k, dloss[k]);
    r.number_fix = true;
  } else if (with_ce && lab.in_range) {
    r.label_column = lab.label;
    r.label_fix = scaled(grad_ce, lse_prob(z_label, st.vocab) - acc_t(1));
  }
  return r;
}

// Both stages of one row at once (the CPU operators, the CUDA two-pass forward).
template <typename acc_t, typename Row>
NTL_HD void row_forward(const Row& row, const RowLabel& lab, acc_t z_label, const RowStats<acc_t>& st,
                        bool with_ce, const Options& opt, acc_t* ce, acc_t* ntl) {
  const ForwardTerms<acc_t, Row> terms{row, lab.number, st.number, opt};
  row_forward_finish(row, lab, z_label, st, terms, with_ce, opt, ce, ntl);
}

// fix[0..K) doubles as the dloss workspace.
template <typename acc_t, typename Row>
NTL_HD RowGradient<acc_t> row_backward(const Row& row, const RowLabel& lab, acc_t z_label,
                                       const RowStats<acc_t>& st, acc_t grad_ce, acc_t grad_ntl,
                                       bool with_ce, const Options& opt, acc_t* fix) {
  const NumberGradientTerms<acc_t> terms = (!lab.bad && lab.number >= 0)
                                               ? number_gradient_terms(row, lab.number, st.number, with_ce, opt, fix)
                                               : NumberGradientTerms<acc_t>{0, 0, 0, {0, 0}};
  return row_backward_finish(row, lab, z_label, st, grad_ce, grad_ntl, with_ce, opt, terms, fix, fix);
}

}  // namespace ntl
