// CUDA kernels of the ntl_fast operators: one thread block per row of logits.
//
// Forward: the block computes LSE_V (or, for reweighed rows, the LSE of the text tokens) with an
// online max + sum (one read of the row), warp 0 gathers the K number-token logits into shared
// memory and forms LSE_N and their probabilities, then thread 0 scores them with the shared math of
// ntl_math.h. Backward: a small kernel first runs the number-token part of the gradient that
// needs no LSE_V (number_gradient_terms: one warp per row, the same way, lane 0 running the math) and leaves
// ∂L/∂z_k and a few scalars per row in a workspace; then, per row, the block's threads finish the
// gradient of the number columns into shared memory, each its share of the K columns, and of the
// label column (row_backward_finish, reading the logits it needs first), the block writes
// coef * p_k over the row (one read, one write per element), and the threads write the fixed
// columns, each column by the one k the table's inverse map names, so that a table with a repeated
// id still gives one deterministic result. Reading before writing lets the backward run in place.
// Loss and gradient in one pass: the same number-terms kernel, then per row the forward and its
// backward. A row that fits in shared memory is staged there by the forward's sweep and the
// gradient is formed from it: the logits come from DRAM once by construction. A wider row is read
// again for the gradient, on a persistent grid bounded so that the rows in flight stay within
// half of L2 (plan_loss_and_grad in ntl_kernels.h). With the heaviest number-token math
// (number_stats and its gradient sums) in its own kernel, and the dense read and write behind
// calls, the dense kernels keep the registers of their dense loops (40 at most for 4- and 2-byte
// types: 3 blocks of 512 threads per SM). Rows whose losses are constants (ignore_index, bad
// labels) read nothing and get a zero gradient. The kernels read the table as given (the host
// never reads device memory to check it) and stay in bounds and deterministic whatever it holds.
//
// The dense loops move 16-byte packs from the first 16-byte boundary of each row on (a scalar
// head and tail around them), each thread issuing all the loads of a step before its first store.
// Registers do not depend on K: the number-token loops run over shared or global memory, the
// fixes live in K values of dynamic shared memory and the per-row number-token terms in the
// workspace. The number-token sums run serially in one thread per row, over logits, exps and
// probabilities a warp formed in parallel: they keep the order of the CPU operators' (the same bits).
//
// Torch-free: only the CUDA runtime and its bf16/fp16 headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "../ntl_math.h"
#include "ntl_kernels.h"

namespace ntl {
namespace {

NTL_HD float load_acc(float x) { return x; }
NTL_HD double load_acc(double x) { return x; }
NTL_HD float load_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
NTL_HD float load_acc(__half x) { return __half2float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half store_as<__half>(float x) { return __float2half(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t store_as(double x) { return x; }

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// One row's number-token logits, read from global memory (bounds-checked ids).
template <typename scalar_t, typename acc_t>
struct GlobalRow : NumberColumns {
  const scalar_t* z;
  const int64_t* ids;
  int64_t V;

  NTL_HD acc_t logit(int64_t k) const {
    const int64_t id = ids[k];
    return (id >= 0 && id < V) ? acc_t(load_acc(z[id])) : acc_t(NAN);
  }
};

// The same row with its number-token logits gathered into shared memory first (by many threads at
// once, where one thread reading them one by one waits on K dependent scattered loads), and, where
// there is room, their probabilities q_k formed ahead by a warp: logit(k) is exactly
// GlobalRow::logit(k) and probs[k] exactly number_prob's value, so the math of ntl_math.h gives the
// same bits either way, while the exp of every q_k is spread over a warp.
template <typename acc_t>
struct GatheredRow : NumberColumns {
  const acc_t* gathered;  // [0, K): GlobalRow::logit(k)
  const acc_t* probs;     // [0, K): lse_prob(gathered[k], number), or nullptr
  LogSumExp<acc_t> number;

  NTL_HD acc_t logit(int64_t k) const { return gathered[k]; }
};

// number_prob of ntl_math.h for a gathered row (found by argument-dependent lookup, more
// specialised than the general one): the probability formed ahead when asked against the LSE_N it
// was formed with, the same bits.
template <typename acc_t>
NTL_HD acc_t number_prob(const GatheredRow<acc_t>& row, int64_t k, const LogSumExp<acc_t>& lse_number) {
  if (row.probs != nullptr && lse_number.max == row.number.max && lse_number.log_sum == row.number.log_sum)
    return row.probs[k];
  return lse_prob(acc_t(row.logit(k)), lse_number);
}

// Whether a row's probabilities fit in shared memory beside its gathered logits (2 K values per
// row, at most 40 KiB: under the 48 KiB a launch gets without opting in).
template <typename acc_t>
NTL_HD bool probs_fit(int64_t K) {
  return 2 * K * int64_t(sizeof(acc_t)) <= int64_t(40) * 1024;
}

// The first phase of number_logsumexp (ntl_math.h) over a gathered row, by a warp whose lane l
// holds k = l, l + 32, ...: the max (the first of the largest, as the serial loop keeps it: the
// same bits) and whether a logit is NaN, to every lane; then, when the sum is needed and probs is
// given, exp(z_k - max) into probs[k] by the lane holding k.
template <typename acc_t>
__device__ __forceinline__ void warp_number_max(const acc_t* gathered, acc_t* probs, int64_t K, int lane, acc_t* mx,
                                                bool* nan) {
  acc_t best = -INFINITY;
  int at = int(K);
  bool any_nan = false;
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t z = gathered[k];
    any_nan |= z != z;
    if (z > best) {
      best = z;
      at = int(k);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_at = __shfl_xor_sync(0xffffffffu, at, offset);
    if (other > best || (other == best && other_at < at)) {
      best = other;
      at = other_at;
    }
  }
  *nan = __any_sync(0xffffffffu, any_nan);
  *mx = best;
  if (probs != nullptr && !*nan && best != acc_t(-INFINITY))
    for (int64_t k = lane; k < K; k += 32) probs[k] = ntl_exp(gathered[k] - best);
}

// The second phase, after a barrier: lane 0 sums the exps in k order (from probs, or forming them
// when probs is null), as number_logsumexp does; every lane of the warp gets LSE_N.
template <typename acc_t>
__device__ __forceinline__ LogSumExp<acc_t> warp_number_finish(const acc_t* gathered, const acc_t* probs, int64_t K,
                                                               int lane, acc_t mx, bool nan) {
  LogSumExp<acc_t> lse{0, 0};
  if (lane == 0) {
    if (nan || mx == acc_t(-INFINITY)) {
      lse = lse_finish(mx, acc_t(0), nan);
    } else {
      acc_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += probs != nullptr ? probs[k] : ntl_exp(gathered[k] - mx);
      lse = lse_finish(mx, sum, false);
    }
  }
  lse.max = __shfl_sync(0xffffffffu, lse.max, 0);
  lse.log_sum = __shfl_sync(0xffffffffu, lse.log_sum, 0);
  return lse;
}

// probs[k] = number_prob's q_k against LSE_N, by the lane holding k.
template <typename acc_t>
__device__ __forceinline__ void warp_number_probs(const acc_t* gathered, acc_t* probs, int64_t K, int lane,
                                                  const LogSumExp<acc_t>& lse) {
  if (probs == nullptr) return;
  for (int64_t k = lane; k < K; k += 32) probs[k] = lse_prob(gathered[k], lse);
}

// out[k] = row.logit(k) for k = first, first + step, ... below K.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void gather_number_logits(const GlobalRow<scalar_t, acc_t>& row, acc_t* out, int first,
                                                     int step) {
  for (int64_t k = first; k < row.K; k += step) out[k] = row.logit(k);
}

__device__ __forceinline__ int64_t read_label(const CudaRows& a, int64_t r) {
  return a.labels_int32 ? int64_t(static_cast<const int32_t*>(a.labels)[r])
                        : static_cast<const int64_t*>(a.labels)[r];
}

// Merge two (max, sum of exp(x - max)) pairs.
template <typename acc_t>
__device__ __forceinline__ void merge_lse(acc_t& m, acc_t& s, acc_t other_m, acc_t other_s) {
  const acc_t next = fmax(m, other_m);
  if (next == acc_t(-INFINITY)) return;
  s = s * ntl_exp(m - next) + other_s * ntl_exp(other_m - next);
  m = next;
}

// ------------------------------------------------------------------------------- 16-byte accesses
// A row is read and written in 16-byte packs (4 float32, 8 bfloat16/float16, 2 float64) from the
// first 16-byte boundary on; the elements before it (the head) and after the last whole pack (the
// tail) take scalar accesses. The split is computed at run time from the address, so any row of
// any tensor works, and a gradient buffer whose alignment differs from the logits' falls back to
// scalar accesses.
template <typename scalar_t>
struct Pack {
  static constexpr int kSize = 16 / int(sizeof(scalar_t));
  scalar_t v[kSize];
};

// Packs each thread has in flight in the gradient pass: all its loads are issued before its first
// store, 16 values of 2- and 4-byte types, 8 of float64.
template <typename scalar_t>
struct InFlight {
  static constexpr int kPacks = sizeof(scalar_t) == 2 ? 2 : 4;
};

// A pack moves as one uint4 (ld/st.global.v4.u32); its elements are bit copies of the words.
__device__ __forceinline__ void unpack(uint32_t w, float* v) { v[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack(uint32_t w, __nv_bfloat16* v) {
  v[0] = __ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu));
  v[1] = __ushort_as_bfloat16(static_cast<unsigned short>(w >> 16));
}
__device__ __forceinline__ void unpack(uint32_t w, __half* v) {
  v[0] = __ushort_as_half(static_cast<unsigned short>(w & 0xffffu));
  v[1] = __ushort_as_half(static_cast<unsigned short>(w >> 16));
}
__device__ __forceinline__ uint32_t packed(const float* v) { return __float_as_uint(v[0]); }
__device__ __forceinline__ uint32_t packed(const __nv_bfloat16* v) {
  return uint32_t(__bfloat16_as_ushort(v[0])) | (uint32_t(__bfloat16_as_ushort(v[1])) << 16);
}
__device__ __forceinline__ uint32_t packed(const __half* v) {
  return uint32_t(__half_as_ushort(v[0])) | (uint32_t(__half_as_ushort(v[1])) << 16);
}

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> unpack_raw(const uint4& raw) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  Pack<scalar_t> out;
  if constexpr (sizeof(scalar_t) == 8) {
    out.v[0] = __longlong_as_double(static_cast<long long>((uint64_t(w[1]) << 32) | w[0]));
    out.v[1] = __longlong_as_double(static_cast<long long>((uint64_t(w[3]) << 32) | w[2]));
  } else {
    constexpr int kPerWord = 4 / int(sizeof(scalar_t));
#pragma unroll
    for (int i = 0; i < 4; ++i) unpack(w[i], out.v + i * kPerWord);
  }
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  return unpack_raw<scalar_t>(raw);
}

// p[u] = the pack base + u * stride of body, for the u < kFlight below `packs`: every load issued
// before the first use.
template <typename scalar_t, int kFlight>
__device__ __forceinline__ void load_packs(const scalar_t* body, int64_t base, int64_t stride, int64_t packs,
                                           Pack<scalar_t> (&p)[kFlight]) {
#pragma unroll
  for (int u = 0; u < kFlight; ++u) {
    const int64_t pack = base + int64_t(u) * stride;
    if (pack < packs) p[u] = load_pack(body + pack * Pack<scalar_t>::kSize);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& x) {
  uint32_t w[4];
  if constexpr (sizeof(scalar_t) == 8) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x.v[i]));
      w[2 * i] = uint32_t(bits);
      w[2 * i + 1] = uint32_t(bits >> 32);
    }
  } else {
    constexpr int kPerWord = 4 / int(sizeof(scalar_t));
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = packed(x.v + i * kPerWord);
  }
  uint4 raw;
  raw.x = w[0];
  raw.y = w[1];
  raw.z = w[2];
  raw.w = w[3];
  // One 16-byte store (a plain assignment may be split into narrower stores), cached in L2 only:
  // the gradient is not read again by this kernel.
  __stcg(reinterpret_cast<uint4*>(p), raw);
}

// [0, head) and [tail, n) by scalar accesses, `packs` 16-byte packs in between.
struct Split {
  int64_t head, packs, tail;
};

template <typename scalar_t>
__device__ __forceinline__ Split split_at_alignment(const void* p, int64_t n) {
  constexpr int64_t kSize = Pack<scalar_t>::kSize;
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  int64_t head = n;  // an address that is no multiple of the element size: all scalar
  if (address % sizeof(scalar_t) == 0) head = int64_t((16 - address % 16) % 16 / sizeof(scalar_t));
  head = head < n ? head : n;
  const int64_t packs = (n - head) / kSize;
  return {head, packs, head + packs * kSize};
}

// A running (max, Σ exp(x - max)) of one thread. NaN values never update it: flagged apart.
template <typename acc_t>
struct RunningLse {
  acc_t m, s;
  bool nan;

  template <int n>
  __device__ __forceinline__ void add(const acc_t (&x)[n]) {
    acc_t group_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < n; ++j) {
      nan |= x[j] != x[j];
      group_max = fmax(group_max, x[j]);
    }
    const acc_t next = fmax(m, group_max);
    if (next == acc_t(-INFINITY)) return;
    acc_t sum = s * ntl_exp(m - next);
#pragma unroll
    for (int j = 0; j < n; ++j) sum += ntl_exp(x[j] - next);
    s = sum;
    m = next;
  }
};

// The LSE of the row (text_only: of its columns off N, by number_index), returned to every thread
// of the block. NaN logits give NaN. kStage: every element of the row is also copied, as loaded,
// to stage[0, V) in shared memory (stage congruent to z modulo 16 bytes, so that its packs are
// 16-byte aligned where z's are), for the gradient pass to read instead of global memory.
template <typename scalar_t, typename acc_t, bool kStage = false>
__device__ LogSumExp<acc_t> block_logsumexp(const scalar_t* z, int64_t V, bool text_only,
                                            const int64_t* number_index, scalar_t* stage = nullptr) {
  __shared__ acc_t warp_m[32], warp_s[32];
  __shared__ LogSumExp<acc_t> result;
  // 8 values per thread and step (two float32 packs, one of the 2-byte types): enough loads in
  // flight with the block's other threads, and few registers.
  constexpr int kSize = Pack<scalar_t>::kSize, kFlight = sizeof(scalar_t) == 4 ? 2 : 1;
  RunningLse<acc_t> run{-INFINITY, 0, false};
  if (text_only) {  // reweighed NTL-valid rows: the columns off N, one by one through number_index
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const bool text = number_index[i] < 0;
      acc_t x[1] = {acc_t(-INFINITY)};
      if (kStage) {  // the number columns too: the gradient pass reads every column from the stage
        const scalar_t v = z[i];
        stage[i] = v;
        if (text) x[0] = acc_t(load_acc(v));
      } else if (text) {
        x[0] = acc_t(load_acc(z[i]));
      }
      run.add(x);
    }
  } else {
    const Split split = split_at_alignment<scalar_t>(z, V);
    for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) {
      const scalar_t v = z[i];
      if (kStage) stage[i] = v;
      const acc_t x[1] = {acc_t(load_acc(v))};
      run.add(x);
    }
    for (int64_t i = split.tail + threadIdx.x; i < V; i += blockDim.x) {
      const scalar_t v = z[i];
      if (kStage) stage[i] = v;
      const acc_t x[1] = {acc_t(load_acc(v))};
      run.add(x);
    }
    const scalar_t* body = z + split.head;
    for (int64_t base = threadIdx.x; base < split.packs; base += int64_t(blockDim.x) * kFlight) {
      uint4 raw[kFlight];
#pragma unroll
      for (int u = 0; u < kFlight; ++u) {  // every load issued before the first use
        const int64_t pack = base + int64_t(u) * blockDim.x;
        if (pack < split.packs) raw[u] = *reinterpret_cast<const uint4*>(body + pack * kSize);
      }
#pragma unroll
      for (int u = 0; u < kFlight; ++u) {  // the packs merged one by one: fewer values live at once
        const int64_t pack = base + int64_t(u) * blockDim.x;
        if (pack >= split.packs) break;
        if (kStage) *reinterpret_cast<uint4*>(stage + split.head + pack * kSize) = raw[u];
        const Pack<scalar_t> p = unpack_raw<scalar_t>(raw[u]);
        acc_t x[kSize];
#pragma unroll
        for (int j = 0; j < kSize; ++j) x[j] = acc_t(load_acc(p.v[j]));
        run.add(x);
      }
    }
  }
  acc_t m = run.m, s = run.s;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t om = __shfl_xor_sync(0xffffffffu, m, offset);
    const acc_t os = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_lse(m, s, om, os);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  const bool any_nan = __syncthreads_or(run.nan);
  if (warp == 0) {
    m = lane < warps ? warp_m[lane] : acc_t(-INFINITY);
    s = lane < warps ? warp_s[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc_t om = __shfl_xor_sync(0xffffffffu, m, offset);
      const acc_t os = __shfl_xor_sync(0xffffffffu, s, offset);
      merge_lse(m, s, om, os);
    }
    if (lane == 0) result = lse_finish(m, s, any_nan);
  }
  __syncthreads();
  return result;
}

// block_logsumexp behind a call: the one-pass kernel's dense read and its gradient write are then
// scheduled apart, and their registers do not add up.
template <typename scalar_t, typename acc_t, bool kStage>
__device__ __noinline__ LogSumExp<acc_t> block_logsumexp_apart(const scalar_t* z, int64_t V, bool text_only,
                                                               const int64_t* number_index, scalar_t* stage) {
  return block_logsumexp<scalar_t, acc_t, kStage>(z, V, text_only, number_index, stage);
}

// out[i] = scale * exp(z[i] - mx) for i in [begin, end), by scalar accesses, each thread with
// `kSize` loads in flight before its first store.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scalar_probabilities(const scalar_t* z, scalar_t* out, int64_t begin, int64_t end,
                                                     acc_t scale, acc_t mx) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(blockDim.x) * kSize) {
    acc_t x[kSize];
#pragma unroll
    for (int j = 0; j < kSize; ++j) {
      const int64_t i = base + int64_t(j) * blockDim.x;
      x[j] = i < end ? acc_t(load_acc(z[i])) : acc_t(0);
    }
#pragma unroll
    for (int j = 0; j < kSize; ++j) {
      const int64_t i = base + int64_t(j) * blockDim.x;
      if (i < end) out[i] = store_as<scalar_t>(scale * ntl_exp(x[j] - mx));
    }
  }
}

// out[i] = scale * exp(z[i] - mx) over a row. Each thread issues the loads of its group of packs
// before its first store, and owns its elements: z may equal out (in place).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_probabilities(const scalar_t* z, scalar_t* out, int64_t V, acc_t scale,
                                                    acc_t mx) {
  constexpr int kSize = Pack<scalar_t>::kSize, kFlight = InFlight<scalar_t>::kPacks;
  const uintptr_t offset = reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(z);
  // A gradient buffer off the logits' alignment: scalar accesses, still several loads in flight.
  const Split split = offset % 16 == 0 ? split_at_alignment<scalar_t>(z, V) : Split{V, 0, V};
  scalar_probabilities(z, out, 0, split.head, scale, mx);
  scalar_probabilities(z, out, split.tail, V, scale, mx);
  const scalar_t* body = z + split.head;
  scalar_t* body_out = out + split.head;
  for (int64_t base = threadIdx.x; base < split.packs; base += int64_t(blockDim.x) * kFlight) {
    Pack<scalar_t> p[kFlight];
    load_packs(body, base, blockDim.x, split.packs, p);
#pragma unroll
    for (int u = 0; u < kFlight; ++u) {
      const int64_t pack = base + int64_t(u) * blockDim.x;
      if (pack >= split.packs) continue;
#pragma unroll
      for (int j = 0; j < kSize; ++j) p[u].v[j] = store_as<scalar_t>(scale * ntl_exp(acc_t(load_acc(p[u].v[j])) - mx));
      store_pack(body_out + pack * kSize, p[u]);
    }
  }
}

// out[0, V) = 0, without reading anything.
template <typename scalar_t>
__device__ __forceinline__ void write_zeros(scalar_t* out, int64_t V) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  const Split split = split_at_alignment<scalar_t>(out, V);
  const scalar_t zero = store_as<scalar_t>(typename AccType<scalar_t>::type(0));
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) out[i] = zero;
  for (int64_t i = split.tail + threadIdx.x; i < V; i += blockDim.x) out[i] = zero;
  Pack<scalar_t> zeros;
#pragma unroll
  for (int j = 0; j < kSize; ++j) zeros.v[j] = zero;
  for (int64_t pack = threadIdx.x; pack < split.packs; pack += blockDim.x)
    store_pack(out + split.head + pack * kSize, zeros);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ GlobalRow<scalar_t, acc_t> global_row(const CudaRows& a, const scalar_t* z) {
  return GlobalRow<scalar_t, acc_t>{{a.number_values, a.value_order, a.sorted_gaps, a.K}, z, a.number_ids, a.V};
}

// Blocks of 512 threads an SM must fit for the dense kernels: 3 (75% occupancy, at most 40
// registers) for the float32 and 2-byte types; float64 rows are left the registers they need.
template <typename scalar_t>
struct DenseBlocksPerSm {
  static constexpr int value = sizeof(scalar_t) == 8 ? 1 : 3;
};

extern __shared__ __align__(16) unsigned char ntl_dynamic_smem[];

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512, DenseBlocksPerSm<scalar_t>::value) forward_kernel(const CudaRows a) {
  const int64_t r = blockIdx.x;
  const scalar_t* z = static_cast<const scalar_t*>(a.logits) + r * a.V;
  __shared__ RowLabel lab;
  __shared__ int dense_kind;
  if (threadIdx.x == 0) {
    lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
    dense_kind = dense_lse_kind(lab, a.with_ce, a.options);
  }
  __syncthreads();
  LogSumExp<acc_t> dense{0, 0};
  if (dense_kind != kNoDense)
    dense = block_logsumexp<scalar_t, acc_t>(z, a.V, dense_kind == kDenseText, a.number_index);
  // NTL-valid rows: warp 0 gathers the K number logits into shared memory and forms LSE_N and the
  // probabilities q_k (the max and the exps spread over its lanes, the sum in order), then thread 0
  // scores them (number_stats: several passes over K) from there.
  acc_t* gathered = reinterpret_cast<acc_t*>(ntl_dynamic_smem);
  acc_t* probs = probs_fit<acc_t>(a.K) ? gathered + a.K : nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  LogSumExp<acc_t> number{0, 0};
  if (lab.number >= 0) {
    acc_t mx = 0;
    bool nan = false;
    if (warp == 0) {
      gather_number_logits(global_row<scalar_t, acc_t>(a, z), gathered, lane, 32);
      warp_number_max(gathered, probs, a.K, lane, &mx, &nan);
    }
    __syncthreads();  // every exp before lane 0 sums them
    if (warp == 0) number = warp_number_finish(gathered, probs, a.K, lane, mx, nan);
    __syncthreads();  // lane 0 done with the exps before they become probabilities
    if (warp == 0) warp_number_probs(gathered, probs, a.K, lane, number);
    __syncthreads();  // every gathered logit and probability before thread 0 reads them
  }
  if (threadIdx.x != 0) return;
  const GatheredRow<acc_t> row{{a.number_values, a.value_order, a.sorted_gaps, a.K}, gathered, probs, number};
  const RowStats<acc_t> stats = row_stats_with_number(lab, dense_kind, dense, number);
  const acc_t z_label = lab.in_range ? acc_t(load_acc(z[lab.label])) : acc_t(0);
  acc_t ce = 0, ntl = 0;
  row_forward(row, lab, z_label, stats, a.with_ce, a.options, &ce, &ntl);
  if (a.with_ce) static_cast<acc_t*>(a.ce)[r] = ce;
  static_cast<acc_t*>(a.ntl)[r] = ntl;
  stats.store(static_cast<acc_t*>(a.row_stats) + r * RowStats<acc_t>::kSize);
}

// What a dense kernel's block works on: row first + i (workspace row i), its logits, its gradient,
// and the fixes of its number columns at the start of dynamic shared memory.
template <typename scalar_t, typename acc_t>
struct BlockRow {
  int64_t r;
  const scalar_t* z;
  scalar_t* out;
  acc_t* fix;
  __device__ __forceinline__ BlockRow(const CudaRows& a, int64_t first, int64_t i)
      : r(first + i),
        z(static_cast<const scalar_t*>(a.logits) + r * a.V),
        out(static_cast<scalar_t*>(a.grad_logits) + r * a.V),
        fix(reinterpret_cast<acc_t*>(ntl_dynamic_smem)) {}
};

// The dense part of a row's gradient, coef * p_k on every column (zeros when coef is 0, without
// reading the row), then the fixed columns, spread over the block's threads: column ids[k] only by
// the k that number_index names for it, so a repeated id (or a label column that is also a number
// id, in a corrupt table) has one writer, never a race. g and fix were computed from the logits
// before the first barrier here, so the dense write may overwrite them (in place).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row_gradient(const scalar_t* z, scalar_t* out, int64_t V, int64_t K,
                                                   const int64_t* number_ids, const int64_t* number_index,
                                                   const RowGradient<acc_t>& g, const LogSumExp<acc_t>& vocab,
                                                   const acc_t* fix) {
  const acc_t coef = g.coef;
  if (coef != acc_t(0)) {
    // coef * exp(z - LSE_V) as (coef / Σ) * exp(z - max): shift-invariant, one exp per element.
    write_probabilities(z, out, V, coef * ntl_exp(-vocab.log_sum), vocab.max);
  } else {
    write_zeros(out, V);
  }
  __syncthreads();
  if (g.number_fix) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = number_ids[k];
      // one writer per column, the k its inverse names (a raw operator's table may repeat an id)
      if (id >= 0 && id < V && number_index[id] == k) out[id] = store_as<scalar_t>(fix[k]);
    }
  }
  // not a number column (number_index[label] < 0), so no k above writes it
  if (threadIdx.x == 0 && g.label_column >= 0) out[g.label_column] = store_as<scalar_t>(g.label_fix);
}

// ------------------------------------------------------------------------------- number-token terms
// The workspace holds, per row of a chunk, kTerms scalars (NumberGradientTerms) then the K values
// ∂L/∂z_k before reweighing; the chunk's rows fill at most kWorkspaceBytes.
constexpr int64_t kTerms = 5;
constexpr int64_t kWorkspaceBytes = int64_t(64) << 20;
constexpr int kTermsWarps = 4;  // rows per block of the number-terms kernels, at most

// Shared memory per row (warp) of the number-terms kernels: its gathered logits and, where they
// fit, its probabilities.
template <typename acc_t>
size_t terms_row_bytes(int64_t K) {
  return size_t(K) * sizeof(acc_t) * (probs_fit<acc_t>(K) ? 2 : 1);
}

// Warps (rows) per block of the number-terms kernels: at most kTermsWarps, and their shared memory
// within the 48 KiB a launch gets without opting in.
template <typename acc_t>
int terms_warps(int64_t K) {
  const size_t row = terms_row_bytes<acc_t>(K);
  const int64_t fit = int64_t(48 * 1024) / int64_t(row > 0 ? row : 1);
  return int(fit < 1 ? 1 : (fit < kTermsWarps ? fit : kTermsWarps));
}

int64_t chunk_rows(int64_t M, int64_t K, int64_t acc_size) {
  const int64_t rows = kWorkspaceBytes / ((K + kTerms) * acc_size);
  const int64_t at_least_one = rows > 1 ? rows : 1;
  return at_least_one < M ? at_least_one : M;
}

template <typename acc_t>
__device__ __forceinline__ acc_t* workspace_row(const CudaRows& a, int64_t chunk_row) {
  return static_cast<acc_t*>(a.workspace) + chunk_row * (a.K + kTerms);
}

// One warp per row of [first, first + rows), warp w of the block on row blockIdx.x * warps + w:
// the number-token terms of the NTL-valid rows (LSE_N from the saved rows, or, in one pass, from
// the number logits). The warp's lanes gather the row's K number logits into the warp's share of
// dynamic shared memory (32 scattered loads in flight) and form LSE_N (in one pass) and the
// probabilities q_k, each lane its k; lane 0 then runs the math of ntl_math.h over them: the same
// bits as one thread doing it all. Every warp passes the same barriers, with a row or without.
template <typename scalar_t, typename acc_t, bool kOnePass>
__device__ __forceinline__ void number_terms(const CudaRows& a, int64_t first, int64_t rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x / 32) + warp;
  const int64_t r = first + i;
  RowLabel lab{0, -1, false, false};
  if (i < rows) lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
  const bool valid = lab.number >= 0;
  const bool with_probs = probs_fit<acc_t>(a.K);
  acc_t* gathered = reinterpret_cast<acc_t*>(ntl_dynamic_smem) + int64_t(warp) * a.K * (with_probs ? 2 : 1);
  acc_t* probs = with_probs ? gathered + a.K : nullptr;
  if (valid) {
    const scalar_t* z = static_cast<const scalar_t*>(a.logits) + r * a.V;
    gather_number_logits(global_row<scalar_t, acc_t>(a, z), gathered, lane, 32);
  }
  LogSumExp<acc_t> lse_number{0, 0};
  if (kOnePass) {
    acc_t mx = 0;
    bool nan = false;
    if (valid) warp_number_max(gathered, probs, a.K, lane, &mx, &nan);
    __syncthreads();  // every exp before lane 0 sums them
    if (valid) lse_number = warp_number_finish(gathered, probs, a.K, lane, mx, nan);
    __syncthreads();  // lane 0 done with the exps before they become probabilities
  } else if (valid) {
    lse_number = RowStats<acc_t>::load(static_cast<const acc_t*>(a.row_stats) + r * RowStats<acc_t>::kSize).number;
  }
  if (valid) warp_number_probs(gathered, probs, a.K, lane, lse_number);
  __syncthreads();  // every gathered logit and probability before lane 0 reads them
  if (!valid || lane != 0) return;
  const GatheredRow<acc_t> row{{a.number_values, a.value_order, a.sorted_gaps, a.K}, gathered, probs, lse_number};
  acc_t* w = workspace_row<acc_t>(a, i);
  const NumberGradientTerms<acc_t> terms =
      number_gradient_terms(row, lab.number, lse_number, a.with_ce, a.options, w + kTerms);
  w[0] = terms.loss;
  w[1] = terms.y;
  w[2] = terms.log_norm;
  w[3] = terms.number.max;
  w[4] = terms.number.log_sum;
}

// The number terms of backward_kernel and of loss_and_grad_kernel (no launch bounds: at most 128
// threads per block, the registers the math needs).
template <typename scalar_t, typename acc_t>
__global__ void backward_terms_kernel(const CudaRows a, int64_t first, int64_t rows) {
  number_terms<scalar_t, acc_t, false>(a, first, rows);
}

template <typename scalar_t, typename acc_t>
__global__ void loss_and_grad_terms_kernel(const CudaRows a, int64_t first, int64_t rows) {
  number_terms<scalar_t, acc_t, true>(a, first, rows);
}

template <typename acc_t>
__device__ __forceinline__ NumberGradientTerms<acc_t> load_terms(const CudaRows& a, int64_t chunk_row,
                                                                 const RowLabel& lab) {
  const acc_t* w = workspace_row<acc_t>(a, chunk_row);
  return lab.number >= 0 ? NumberGradientTerms<acc_t>{w[0], w[1], w[2], {w[3], w[4]}}
                         : NumberGradientTerms<acc_t>{0, 0, 0, {0, 0}};
}

// Every thread of the block: the row's gradient coefficients (the same in each thread; thread 0
// stores them in g) and its share of the K fixes, k = threadIdx.x + i blockDim.x, from the
// number-token terms (read for NTL-valid rows only) and logits read before any gradient write.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_row_gradient(const CudaRows& a, int64_t chunk_row, const scalar_t* z,
                                                    const RowLabel& lab,
                                                    const RowStats<acc_t>& stats,
                                                    const NumberGradientTerms<acc_t>& terms, acc_t grad_ce,
                                                    acc_t grad_ntl, acc_t* fix, RowGradient<acc_t>& g) {
  const GlobalRow<scalar_t, acc_t> row = global_row<scalar_t, acc_t>(a, z);
  const acc_t z_label = lab.in_range ? acc_t(load_acc(z[lab.label])) : acc_t(0);
  const RowGradient<acc_t> mine =
      row_backward_finish(row, lab, z_label, stats, grad_ce, grad_ntl, a.with_ce, a.options, terms,
                          workspace_row<acc_t>(a, chunk_row) + kTerms, fix, threadIdx.x, blockDim.x);
  if (threadIdx.x == 0) g = mine;
}

// write_row_gradient behind a call (see block_logsumexp_apart), its inputs by address: g in shared
// memory, LSE_V's max and log-sum wherever the kernel holds them.
template <typename scalar_t, typename acc_t>
__device__ __noinline__ void write_row_gradient_apart(const scalar_t* z, scalar_t* out, int64_t V, int64_t K,
                                                      const int64_t* number_ids, const int64_t* number_index,
                                                      const RowGradient<acc_t>* g, const acc_t* vocab_max,
                                                      const acc_t* vocab_log_sum, const acc_t* fix) {
  write_row_gradient(z, out, V, K, number_ids, number_index, *g, LogSumExp<acc_t>{*vocab_max, *vocab_log_sum},
                     fix);
}

// Rows [first, first + gridDim.x), block i on row first + i (workspace row i), after
// backward_terms_kernel on the same rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512, DenseBlocksPerSm<scalar_t>::value)
    backward_kernel(const CudaRows a, int64_t first) {
  const auto [r, z, out, fix] = BlockRow<scalar_t, acc_t>(a, first, blockIdx.x);
  __shared__ RowLabel lab;
  __shared__ RowStats<acc_t> stats;
  __shared__ NumberGradientTerms<acc_t> terms;
  __shared__ acc_t grad_ce, grad_ntl;
  __shared__ RowGradient<acc_t> g;
  const acc_t* saved = static_cast<const acc_t*>(a.row_stats) + r * RowStats<acc_t>::kSize;
  if (threadIdx.x == 0) {
    stats = RowStats<acc_t>::load(saved);
    lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
    terms = load_terms<acc_t>(a, blockIdx.x, lab);
    grad_ce = a.with_ce ? static_cast<const acc_t*>(a.grad_ce)[r] : acc_t(0);
    grad_ntl = static_cast<const acc_t*>(a.grad_ntl)[r];
  }
  __syncthreads();
  finish_row_gradient<scalar_t, acc_t>(a, blockIdx.x, z, lab, stats, terms, grad_ce, grad_ntl, fix, g);
  __syncthreads();  // g and every fix (and each logit they read) before the dense write
  // LSE_V as RowStats::store saved it: max, then log-sum.
  write_row_gradient_apart(z, out, a.V, a.K, a.number_ids, a.number_index, &g, saved, saved + 1, fix);
}

// The dynamic shared memory of the one-pass kernel: the K fixes (16-byte multiple), then, for a
// staged row, room for the row at the 16-byte phase of its address.
template <typename acc_t>
NTL_HD size_t fixes_bytes(int64_t K) {
  return (size_t(K) * sizeof(acc_t) + 15) / 16 * 16;
}
template <typename scalar_t>
NTL_HD size_t stage_bytes(int64_t V) {
  return size_t(V) * sizeof(scalar_t) + 16;
}

// Where a staged row lives: after the fixes, at the 16-byte phase of z's address (in whole
// elements), so that its packs are 16-byte aligned where z's are.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t* stage_of(const CudaRows& a, const scalar_t* z) {
  const size_t phase = reinterpret_cast<uintptr_t>(z) % 16 / sizeof(scalar_t) * sizeof(scalar_t);
  return reinterpret_cast<scalar_t*>(ntl_dynamic_smem + fixes_bytes<acc_t>(a.K) + phase);
}

// Loss and gradient in one pass (after loss_and_grad_terms_kernel on the same rows), rows
// [first, first + rows) of a chunk, block b on rows b, b + gridDim.x, ...: the forward of the
// row, then d(ce_scale·ce + ntl_scale·ntl)/dz written over it or beside it. kStaged: the row fits
// in shared memory; the LSE sweep copies it there and everything after reads it from there, so
// the logits come from DRAM once by construction (and in place needs no ordering against global
// memory). Otherwise the gradient pass reads the row from global memory again, and the host
// bounds the rows in flight (gridDim.x) so that the second read hits L2. Rows whose losses are
// constants (ignore_index, bad labels) read nothing and get zeros; rows whose two scales are 0
// read the row for their losses only and get zeros.
// One row of loss_and_grad_kernel, the block's current row of the chunk being *chunk_row (in
// shared memory: the pointers are formed again from it after each call). Behind a call, so that
// the compiler hoists none of its work out of the kernel's loop over rows: the kernel then keeps
// the registers of one row.
template <typename scalar_t, typename acc_t, bool kStaged>
__device__ __noinline__ void one_pass_row(const CudaRows& a, int64_t first, const int64_t* chunk_row) {
  __shared__ RowLabel lab;
  __shared__ int dense_kind;
  __shared__ RowStats<acc_t> stats;
  __shared__ NumberGradientTerms<acc_t> terms;
  __shared__ acc_t ce_scale, ntl_scale;
  __shared__ RowGradient<acc_t> g;
  {
    const auto [r, z, out, fix] = BlockRow<scalar_t, acc_t>(a, first, *chunk_row);
    if (threadIdx.x == 0) {
      lab = classify_label(read_label(a, r), a.V, a.K, a.number_index, a.options.ignore_index);
      dense_kind = dense_lse_kind(lab, true, a.options);
    }
  }
  __syncthreads();
  if (dense_kind == kNoDense) {  // ignored or bad: NaN or zero losses, zero gradient, no read
    const auto [r, z, out, fix] = BlockRow<scalar_t, acc_t>(a, first, *chunk_row);
    if (threadIdx.x == 0) {  // row_forward of a row that is not NTL-valid and not in range
      const acc_t loss = lab.bad ? ntl_nan<acc_t>() : acc_t(0);
      static_cast<acc_t*>(a.ce)[r] = loss;
      static_cast<acc_t*>(a.ntl)[r] = loss;
    }
    write_zeros(out, a.V);
    return;
  }
  LogSumExp<acc_t> dense;
  {
    const auto [r, z, out, fix] = BlockRow<scalar_t, acc_t>(a, first, *chunk_row);
    dense = block_logsumexp_apart<scalar_t, acc_t, kStaged>(z, a.V, dense_kind == kDenseText, a.number_index,
                                                            kStaged ? stage_of<scalar_t, acc_t>(a, z) : nullptr);
  }
  const int64_t i = *chunk_row;
  const auto [r, z, out, fix] = BlockRow<scalar_t, acc_t>(a, first, i);
  const scalar_t* zr = kStaged ? stage_of<scalar_t, acc_t>(a, z) : z;  // the row (staged: every column)
  if (threadIdx.x == 0) {
    const GlobalRow<scalar_t, acc_t> row = global_row<scalar_t, acc_t>(a, zr);
    terms = load_terms<acc_t>(a, i, lab);
    stats = row_stats_with_number(lab, dense_kind, dense, terms.number);
    const acc_t z_label = lab.in_range ? acc_t(load_acc(zr[lab.label])) : acc_t(0);
    acc_t ce = 0, ntl = 0;
    row_forward_finish(row, lab, z_label, stats, terms, true, a.options, &ce, &ntl);
    static_cast<acc_t*>(a.ce)[r] = ce;
    static_cast<acc_t*>(a.ntl)[r] = ntl;
    ce_scale = static_cast<const acc_t*>(a.ce_scale)[r];
    ntl_scale = static_cast<const acc_t*>(a.ntl_scale)[r];
    g = RowGradient<acc_t>{0, 0, -1, false};
  }
  __syncthreads();
  if (ce_scale != acc_t(0) || ntl_scale != acc_t(0)) {
    finish_row_gradient<scalar_t, acc_t>(a, i, zr, lab, stats, terms, ce_scale, ntl_scale, fix, g);
    __syncthreads();  // g and every fix (and each logit they read) before the dense write
  }
  write_row_gradient_apart(zr, out, a.V, a.K, a.number_ids, a.number_index, &g, &stats.vocab.max,
                           &stats.vocab.log_sum, fix);
}

// a is a __grid_constant__: one_pass_row reads it where the launch put it (no copy per thread).
template <typename scalar_t, typename acc_t, bool kStaged>
__global__ void __launch_bounds__(512, DenseBlocksPerSm<scalar_t>::value)
    loss_and_grad_kernel(const __grid_constant__ CudaRows a, int64_t first, int64_t rows) {
  __shared__ int64_t chunk_row;  // the block's current row of the chunk
  if (threadIdx.x == 0) chunk_row = blockIdx.x;
  __syncthreads();
  while (chunk_row < rows) {
    one_pass_row<scalar_t, acc_t, kStaged>(a, first, &chunk_row);
    __syncthreads();  // every thread done with this row (its shared values, chunk_row) ...
    if (threadIdx.x == 0) chunk_row += gridDim.x;
    __syncthreads();  // ... before the next row's
  }
}

// grad *= *grad_output over a flat buffer; every block returns before touching it when the
// scalar is 1.
constexpr int kScaleThreads = 256;
constexpr int64_t kScaleMaxBlocks = 4096;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(scalar_t* grad, int64_t numel, const acc_t* grad_output) {
  const acc_t scale = *grad_output;
  if (scale == acc_t(1)) return;
  constexpr int kSize = Pack<scalar_t>::kSize, kFlight = InFlight<scalar_t>::kPacks;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const Split split = split_at_alignment<scalar_t>(grad, numel);
  for (int64_t i = first; i < split.head; i += stride) grad[i] = store_as<scalar_t>(scale * acc_t(load_acc(grad[i])));
  for (int64_t i = split.tail + first; i < numel; i += stride)
    grad[i] = store_as<scalar_t>(scale * acc_t(load_acc(grad[i])));
  scalar_t* body = grad + split.head;
  for (int64_t base = first; base < split.packs; base += stride * kFlight) {
    Pack<scalar_t> p[kFlight];
    load_packs(body, base, stride, split.packs, p);
#pragma unroll
    for (int u = 0; u < kFlight; ++u) {
      const int64_t pack = base + int64_t(u) * stride;
      if (pack >= split.packs) continue;
#pragma unroll
      for (int j = 0; j < kSize; ++j) p[u].v[j] = store_as<scalar_t>(scale * acc_t(load_acc(p[u].v[j])));
      store_pack(body + pack * kSize, p[u]);
    }
  }
}

int threads_for(int64_t V) { return V >= 8192 ? 512 : (V >= 1024 ? 256 : 128); }

enum class Pass { kForward, kBackward, kLossAndGrad };

// ------------------------------------------------------------------------------- one-pass plan
// Shared memory left to the one-pass kernel's static shared variables (under 1 KiB even for
// float64) when deciding whether a row fits beside the fixes.
constexpr size_t kStaticSharedReserve = 2048;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // what a launch gets without opting in

// An environment variable as a count >= 0; -1 when unset or not a count.
int64_t env_count(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return (*end == '\0' && value >= 0) ? int64_t(value) : -1;
}

// How the one-pass kernel runs on the current device (see ntl_kernels.h for the two variables).
// A row that fits in the block's opt-in shared memory beside the fixes is staged there. Otherwise
// each block has one row in flight between its two reads, plus its gradient unless in place: as
// many blocks as keep those bytes within half of L2 (so the second read hits L2), at most the
// blocks the device holds at once (DenseBlocksPerSm per SM) and at least one.
template <typename scalar_t, typename acc_t>
cudaError_t plan_one_pass(const CudaRows& a, OnePassPlan* plan) {
  if (a.K < 0 || a.K > kMaxNumberTokens || a.V < 0) return cudaErrorInvalidValue;
  int device = 0, optin = 0, l2 = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const size_t fixes = fixes_bytes<acc_t>(a.K), staged = fixes + stage_bytes<scalar_t>(a.V);
  plan->staged = env_count("NTL_FAST_CUDA_ROW_IN_SMEM") != 0 && staged + kStaticSharedReserve <= size_t(optin);
  plan->smem = plan->staged ? staged : fixes;
  const size_t in_flight = size_t(a.V) * sizeof(scalar_t) * (a.grad_logits == a.logits ? 1 : 2);
  const int64_t resident = int64_t(sms) * DenseBlocksPerSm<scalar_t>::value;
  int64_t blocks = int64_t(size_t(l2) / 2 / in_flight);
  blocks = blocks < resident ? blocks : resident;
  plan->blocks = plan->staged ? 0 : (blocks > 1 ? blocks : 1);
  const int64_t forced = env_count("NTL_FAST_CUDA_ROWS_IN_FLIGHT");
  if (forced >= 0) plan->blocks = forced;
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t launch(const CudaRows& a, cudaStream_t stream, Pass pass) {
  using acc_t = typename AccType<scalar_t>::type;
  if (a.M == 0) return cudaSuccess;
  if (a.M > 0x7fffffffLL || a.K > kMaxNumberTokens) return cudaErrorInvalidValue;
  if (pass == Pass::kForward) {
    forward_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned int>(a.M)), threads_for(a.V),
                                      terms_row_bytes<acc_t>(a.K), stream>>>(a);
    return cudaGetLastError();
  }
  // As many rows per chunk as the workspace holds.
  const int64_t chunk = int64_t(a.workspace_size / ((a.K + kTerms) * sizeof(acc_t)));
  if (a.workspace == nullptr || chunk < 1 || (pass == Pass::kLossAndGrad && !a.with_ce))
    return cudaErrorInvalidValue;
  const size_t fixes = size_t(a.K) * sizeof(acc_t);
  OnePassPlan plan{false, 0, 0};
  if (pass == Pass::kLossAndGrad) {
    cudaError_t status = plan_one_pass<scalar_t, acc_t>(a, &plan);
    if (status == cudaSuccess && plan.staged && plan.smem > kDefaultDynamicShared)
      status = cudaFuncSetAttribute(loss_and_grad_kernel<scalar_t, acc_t, true>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem));
    // as much of the unified L1 / shared memory as shared as possible: the most staged blocks per SM
    if (status == cudaSuccess && plan.staged)
      status = cudaFuncSetAttribute(loss_and_grad_kernel<scalar_t, acc_t, true>,
                                    cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (status != cudaSuccess) return status;
  }
  for (int64_t first = 0; first < a.M; first += chunk) {  // the number terms of a chunk, then its dense pass
    const int64_t rows = a.M - first < chunk ? a.M - first : chunk;
    const int warps = terms_warps<acc_t>(a.K);
    const size_t terms_smem = size_t(warps) * terms_row_bytes<acc_t>(a.K);
    const dim3 terms_grid(static_cast<unsigned int>((rows + warps - 1) / warps));
    const dim3 grid(static_cast<unsigned int>(rows));
    if (pass == Pass::kBackward) {
      backward_terms_kernel<scalar_t, acc_t><<<terms_grid, warps * 32, terms_smem, stream>>>(a, first, rows);
      backward_kernel<scalar_t, acc_t><<<grid, threads_for(a.V), fixes, stream>>>(a, first);
    } else {
      loss_and_grad_terms_kernel<scalar_t, acc_t><<<terms_grid, warps * 32, terms_smem, stream>>>(a, first, rows);
      // the chunk's rows, by at most plan.blocks blocks (each looping over its rows)
      const dim3 blocks(static_cast<unsigned int>(plan.blocks > 0 && plan.blocks < rows ? plan.blocks : rows));
      if (plan.staged)
        loss_and_grad_kernel<scalar_t, acc_t, true><<<blocks, threads_for(a.V), plan.smem, stream>>>(a, first, rows);
      else
        loss_and_grad_kernel<scalar_t, acc_t, false><<<blocks, threads_for(a.V), plan.smem, stream>>>(a, first, rows);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

cudaError_t dispatch(const CudaRows& a, cudaStream_t stream, Pass pass) {
  switch (a.dtype) {
    case kFloat32: return launch<float>(a, stream, pass);
    case kBFloat16: return launch<__nv_bfloat16>(a, stream, pass);
    case kFloat16: return launch<__half>(a, stream, pass);
    case kFloat64: return launch<double>(a, stream, pass);
    default: return cudaErrorInvalidValue;
  }
}

template <typename scalar_t>
cudaError_t launch_scale(void* grad, int64_t numel, const void* grad_output, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  if (numel == 0) return cudaSuccess;
  const int64_t work = (numel + Pack<scalar_t>::kSize * InFlight<scalar_t>::kPacks - 1) /
                       (Pack<scalar_t>::kSize * InFlight<scalar_t>::kPacks);
  int64_t blocks = (work + kScaleThreads - 1) / kScaleThreads;
  blocks = blocks < kScaleMaxBlocks ? blocks : kScaleMaxBlocks;
  scale_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned int>(blocks)), kScaleThreads, 0, stream>>>(
      static_cast<scalar_t*>(grad), numel, static_cast<const acc_t*>(grad_output));
  return cudaGetLastError();
}

}  // namespace

size_t workspace_bytes(int dtype, int64_t M, int64_t K) {
  if (M <= 0 || K < 0) return 0;
  const int64_t acc_size = dtype == kFloat64 ? 8 : 4;
  return size_t(chunk_rows(M, K, acc_size) * (K + kTerms) * acc_size);
}

cudaError_t launch_forward(const CudaRows& rows, cudaStream_t stream) {
  return dispatch(rows, stream, Pass::kForward);
}

cudaError_t launch_backward(const CudaRows& rows, cudaStream_t stream) {
  return dispatch(rows, stream, Pass::kBackward);
}

cudaError_t launch_loss_and_grad(const CudaRows& rows, cudaStream_t stream) {
  return dispatch(rows, stream, Pass::kLossAndGrad);
}

cudaError_t plan_loss_and_grad(const CudaRows& rows, OnePassPlan* plan) {
  switch (rows.dtype) {
    case kFloat32: return plan_one_pass<float, float>(rows, plan);
    case kBFloat16: return plan_one_pass<__nv_bfloat16, float>(rows, plan);
    case kFloat16: return plan_one_pass<__half, float>(rows, plan);
    case kFloat64: return plan_one_pass<double, double>(rows, plan);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_scale_gradient(void* grad, int dtype, int64_t numel, const void* grad_output,
                                  cudaStream_t stream) {
  if (numel < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return launch_scale<float>(grad, numel, grad_output, stream);
    case kBFloat16: return launch_scale<__nv_bfloat16>(grad, numel, grad_output, stream);
    case kFloat16: return launch_scale<__half>(grad, numel, grad_output, stream);
    case kFloat64: return launch_scale<double>(grad, numel, grad_output, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ntl
