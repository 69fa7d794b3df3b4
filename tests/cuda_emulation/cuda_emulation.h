// CUDA emulation for running the device code of csrc/cuda/*.cu as host C++ (g++ -std=c++17).
//
// What it provides, and how it behaves (tests/cuda_emulation/README.md has the whole account):
//   - the keywords (__global__, __device__, __host__, __forceinline__, __align__, ...); the stub
//     headers in include/ (cuda_runtime.h, cuda_bf16.h, ...) all lead here;
//   - threadIdx / blockIdx / blockDim / gridDim, read from the emulation runtime: every CUDA
//     thread of a block is a fibre, the block's fibres run on one OS thread in a fixed order
//     (each until it blocks at a barrier or returns), and the blocks of a grid run one by one;
//   - __syncthreads[_or|_and|_count] as block barriers and warp shuffles / votes / __syncwarp as
//     warp barriers. The runtime reports divergent barriers (live threads waiting at different
//     barriers), threads that exit while others wait at a barrier, and deadlocks;
//   - __half / __nv_bfloat16 with CUDA's conversions (round to nearest even);
//   - atomics, performed by the runtime (they are not races with each other);
//   - the launch syntax and `__shared__` declarations, which no macro can express, are rewritten
//     by harness.py before compiling (see rewrite_cuda_source there): `k<<<cfg>>>(args)` becomes
//     ntl_emu::launch(k, ntl_emu::configure(cfg))(args), a `__shared__` declaration registers
//     its variables with NTL_EMU_SHARED (poisoned with 0xFF bytes, i.e. NaN, at block start),
//     and `extern __shared__ T name[]` names the launch's dynamic shared memory (an exact-size,
//     poisoned heap buffer, so AddressSanitizer sees an overrun).
// Shared and registered global memory accesses are checked for races in the build that
// instruments the kernel file with -fsanitize=thread (emulation_runtime.cpp supplies the hooks).
// A barrier can be switched off (NTL_EMU_SKIP_BARRIER=file:line) to prove that the checks catch
// its absence.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __CUDACC__
#define __CUDACC__ 1  // the device path of shared headers (e.g. NTL_HD in ntl_math.h)
#endif
#define __host__
#define __device__
#define __global__
#define __constant__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ------------------------------------------------------------------------------- runtime types
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned int x, y, z;
};
struct __align__(16) uint4 {
  unsigned int x, y, z, w;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaDeviceAttr : int {  // the attributes the kernels' launch code asks for (CUDA's values)
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrL2CacheSize = 89,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaSharedCarveout : int { cudaSharedmemCarveoutDefault = -1, cudaSharedmemCarveoutMaxShared = 100 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace ntl_emu {

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  size_t dynamic_smem_limit = 48 * 1024;  // the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
};

// The emulated device (set_device): an H100-like one unless a driver case says otherwise.
struct Device {
  int smem_optin = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_per_sm = 228 * 1024;  // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int l2_bytes = 50 << 20;       // cudaDevAttrL2CacheSize
  int sms = 132;                 // cudaDevAttrMultiProcessorCount
};

// The emulation runtime (emulation_runtime.cpp, not instrumented).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
int syncthreads(const char* file, int line, int kind, int predicate);  // kind: 0 plain, 1 or, 2 and, 3 count
void warp_exchange(const char* file, int line, unsigned mask, const void* in, void* out, size_t size,
                   int mode, int operand, int width);
unsigned warp_vote(const char* file, int line, unsigned mask, int predicate);
void register_shared(void* address, size_t size, const char* name, const char* file, int line);
unsigned char* dynamic_shared_memory();
void run_grid(const LaunchConfig& config, void (*body)(void*), void* context);
Device& device();
void set_device(const Device& d);  // and forgets every kernel's opt-in
cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes);
size_t dynamic_smem_limit(const void* kernel);
void note_atomic(void* address, size_t size);
cudaError_t take_last_error();
const char* error_string(cudaError_t error);

// For the driver: global buffers whose accesses the race checker follows, and what it found.
void track_memory(const void* address, size_t size, const char* name);
void forget_memory();
size_t report_count();        // reports since the last forget_memory()
const char* report(size_t i);  // the first few of them, in order
const char* barriers_reached();  // "file:line;file:line;..." of every barrier executed so far

enum ShuffleMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };

inline LaunchConfig configure(dim3 grid, dim3 block, size_t dynamic_smem = 0, cudaStream_t = nullptr) {
  return LaunchConfig{grid, block, dynamic_smem};
}

// k<<<cfg>>>(args...) after rewriting: the arguments are copied once, like CUDA's parameter
// buffer, and every thread of every block calls the kernel on that copy.
template <typename... P>
auto launch(void (*kernel)(P...), LaunchConfig config) {
  config.dynamic_smem_limit = dynamic_smem_limit(reinterpret_cast<const void*>(kernel));
  return [kernel, config](auto&&... args) {
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
      static void run(void* self) {
        Call* call = static_cast<Call*>(self);
        std::apply(call->kernel, call->params);
      }
    } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<decltype(args)>(args)...)};
    run_grid(config, &Call::run, &call);
  };
}

// A warp-synchronous call, with the source line it was made from (for the reports).
struct Site {
  const char* file;
  int line;

  template <typename T>
  T shfl(int mode, unsigned mask, T value, int operand, int width = 32) const {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffle of an unsupported type");
    T out;
    warp_exchange(file, line, mask, &value, &out, sizeof(T), mode, operand, width);
    return out;
  }
  unsigned ballot(unsigned mask, int predicate) const { return warp_vote(file, line, mask, predicate != 0); }
  bool any(unsigned mask, int predicate) const { return ballot(mask, predicate) != 0u; }
  bool all(unsigned mask, int predicate) const { return ballot(mask, predicate) == mask; }
  void syncwarp(unsigned mask = 0xffffffffu) const { (void)warp_vote(file, line, mask, 1); }
};

// Atomics run here, outside the race checker's view of plain accesses (note_atomic records them).
template <typename T, typename Op>
__attribute__((noinline, no_sanitize_thread)) T atomic_rmw(T* address, Op op) {
  note_atomic(address, sizeof(T));
  const T old = *address;
  *address = op(old);
  return old;
}

}  // namespace ntl_emu

#define threadIdx (::ntl_emu::thread_idx())
#define blockIdx (::ntl_emu::block_idx())
#define blockDim (::ntl_emu::block_dim())
#define gridDim (::ntl_emu::grid_dim())
#define warpSize 32

#define __syncthreads() ((void)::ntl_emu::syncthreads(__FILE__, __LINE__, 0, 1))
#define __syncthreads_or(p) ::ntl_emu::syncthreads(__FILE__, __LINE__, 1, (p) ? 1 : 0)
#define __syncthreads_and(p) ::ntl_emu::syncthreads(__FILE__, __LINE__, 2, (p) ? 1 : 0)
#define __syncthreads_count(p) ::ntl_emu::syncthreads(__FILE__, __LINE__, 3, (p) ? 1 : 0)
#define NTL_EMU_AT (::ntl_emu::Site{__FILE__, __LINE__})
#define __syncwarp(...) NTL_EMU_AT.syncwarp(__VA_ARGS__)
#define __ballot_sync(...) NTL_EMU_AT.ballot(__VA_ARGS__)
#define __any_sync(...) NTL_EMU_AT.any(__VA_ARGS__)
#define __all_sync(...) NTL_EMU_AT.all(__VA_ARGS__)
#define __shfl_sync(...) NTL_EMU_AT.shfl(::ntl_emu::kShflIdx, __VA_ARGS__)
#define __shfl_up_sync(...) NTL_EMU_AT.shfl(::ntl_emu::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) NTL_EMU_AT.shfl(::ntl_emu::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) NTL_EMU_AT.shfl(::ntl_emu::kShflXor, __VA_ARGS__)

// What harness.py writes for `__shared__ T a, b[4];` (after `static T a, b[4];`).
#define NTL_EMU_SHARED(var) ::ntl_emu::register_shared(&(var), sizeof(var), #var, __FILE__, __LINE__)

inline cudaError_t cudaGetLastError() { return ntl_emu::take_last_error(); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const ntl_emu::Device& d = ntl_emu::device();
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// The kernel's dynamic shared memory limit, up to the device's opt-in limit (as CUDA's, which
// also counts the kernel's static shared memory: the launch check does).
// A carveout preference (0-100 percent, or -1) changes nothing here.
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout)
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ntl_emu::set_dynamic_smem_limit(reinterpret_cast<const void*>(kernel), value);
}
inline const char* cudaGetErrorString(cudaError_t error) { return ntl_emu::error_string(error); }

// ------------------------------------------------------------------------------- atomics
template <typename T>
T atomicAdd(T* address, T value) {
  return ntl_emu::atomic_rmw(address, [value](T old) { return T(old + value); });
}
template <typename T>
T atomicSub(T* address, T value) {
  return ntl_emu::atomic_rmw(address, [value](T old) { return T(old - value); });
}
template <typename T>
T atomicExch(T* address, T value) {
  return ntl_emu::atomic_rmw(address, [value](T) { return value; });
}
template <typename T>
T atomicMax(T* address, T value) {
  return ntl_emu::atomic_rmw(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return ntl_emu::atomic_rmw(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return ntl_emu::atomic_rmw(address, [compare, value](T old) { return old == compare ? value : old; });
}

// ------------------------------------------------------------------------------- math
// Host libm stands in for CUDA's: results agree to CUDA's documented ulp bounds, not bit for bit.
using std::fmax;
using std::fmin;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T value) { *p = value; }

// ------------------------------------------------------------------------------- half, bfloat16
namespace ntl_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> binary16, round to nearest even (CUDA's __float2half / __float2half_rn).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7fffu);  // NaN: CUDA's canonical quiet NaN
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {
    // Below 2^-14: a multiple of the subnormal unit 2^-24; scaling by 2^24 is exact and the
    // default rounding mode (nearest even) rounds it; 1024 encodes the smallest normal.
    return uint16_t(sign | uint16_t(std::nearbyint(bits_float(ax) * 16777216.0f)));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // nearest even on the 13 dropped bits
  return uint16_t(sign | ((rounded - (112u << 23)) >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = float(mantissa) * (1.0f / 16777216.0f);  // exact
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float -> bfloat16, round to nearest even (CUDA's __float2bfloat16 / __float2bfloat16_rn).
inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t(0x7fffu);  // CUDA's canonical NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace ntl_emu

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
typedef __half half;

inline __half __float2half(float f) { return __half{ntl_emu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return ntl_emu::half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{ntl_emu::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ntl_emu::bits_float(uint32_t(b.__x) << 16); }

// Reinterpretations (bit copies).
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned int __float_as_uint(float f) { return ntl_emu::float_bits(f); }
inline float __uint_as_float(unsigned int u) { return ntl_emu::bits_float(u); }
inline long long __double_as_longlong(double d) {
  long long u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}
inline double __longlong_as_double(long long u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
