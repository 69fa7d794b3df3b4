// The emulation's own test: kernels with one fault each (and one with none that uses every warp
// operation), to show that cuda_emulation.h reports each fault it promises, and its half /
// bfloat16 conversions. Built through the emulation only (its host code calls ntl_emu directly).
//
//   selftest KERNEL          runs one kernel, prints each report (and each wrong value) on a line
//   selftest convert IN OUT  IN: float32 values; OUT: their half and bfloat16 bits (u16 each),
//                            then the float32 of each of the 65,536 half and bfloat16 patterns
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

__global__ void shared_race(int* out) {
  __shared__ int x;
  if (threadIdx.x == 1) x = 7;
  out[threadIdx.x] = x;  // no barrier between the write and the reads
}

__global__ void global_race(int* out) { out[0] = int(threadIdx.x); }

__global__ void cross_block_race(int* out) {
  if (threadIdx.x == 0) out[0] += 1;  // every block, no ordering between blocks
}

__global__ void divergent_barrier(int*) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit(int*) {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void deadlock(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);  // lane 0 never comes
  }
}

__global__ void poisoned_read(float* out) {
  __shared__ float never_written[4];
  out[threadIdx.x] = never_written[threadIdx.x % 4];
}

__global__ void overrun(int* out) { out[threadIdx.x + 1] = 1; }  // one past the end

constexpr int kWarpOps = 12;

// No fault: every warp operation, the counting barriers, atomics and dynamic shared memory.
__global__ void warp_ops(int* out) {
  extern __shared__ int dynamic_ints[];
  __shared__ int sum;
  const int t = int(threadIdx.x), lane = t % 32;
  int* o = out + t * kWarpOps;
  o[0] = __shfl_sync(0xffffffffu, t, 3);
  o[1] = __shfl_sync(0xffffffffu, t, lane + 1, 8);
  o[2] = __shfl_up_sync(0xffffffffu, t, 2);
  o[3] = __shfl_down_sync(0xffffffffu, t, 5, 16);
  o[4] = __shfl_xor_sync(0xffffffffu, t, 6);
  o[5] = int(__ballot_sync(0xffffffffu, t % 3 == 0));
  o[6] = __any_sync(0xffffffffu, t == 40);
  o[7] = __all_sync(0xffffffffu, t < 64);
  dynamic_ints[t] = t;
  if (t == 0) sum = 0;
  __syncthreads();
  o[8] = dynamic_ints[(t + 1) % int(blockDim.x)];
  atomicAdd(&sum, t);
  o[9] = __syncthreads_count(t % 2);
  o[10] = __syncthreads_or(t == 95) + 2 * __syncthreads_and(t < 95);
  o[11] = sum;
}

namespace {

std::vector<int> warp_ops_expected(int threads) {
  std::vector<int> want(size_t(threads) * kWarpOps);
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, base = t - lane, warp_end = base + 32;
    int* w = &want[size_t(t) * kWarpOps];
    w[0] = base + 3;
    w[1] = base + (lane & ~7) + ((lane + 1) & 7);
    w[2] = lane < 2 ? t : t - 2;
    w[3] = (lane % 16) + 5 >= 16 ? t : t + 5;
    w[4] = base + (lane ^ 6);
    unsigned ballot = 0;
    bool any = false, all = true;
    for (int l = 0; l < 32; ++l) {
      ballot |= unsigned((base + l) % 3 == 0) << l;
      any |= base + l == 40;
      all &= base + l < 64;
    }
    w[5] = int(ballot);
    w[6] = any;
    w[7] = all;
    w[8] = (t + 1) % threads;
    w[9] = threads / 2;
    w[10] = 1 + 0;  // some thread is 95; not all are below 95
    w[11] = threads * (threads - 1) / 2;
    (void)warp_end;
  }
  return want;
}

int run(const std::string& name) {
  const int threads = 96, blocks = 2;
  std::vector<int> ints(size_t(threads) * kWarpOps, 0);
  std::vector<float> floats(threads, 0.0f);
  ntl_emu::forget_memory();
  ntl_emu::track_memory(ints.data(), ints.size() * sizeof(int), "out");
  ntl_emu::track_memory(floats.data(), floats.size() * sizeof(float), "out");
  if (name == "shared_race") shared_race<<<1, threads>>>(ints.data());
  else if (name == "global_race") global_race<<<1, threads>>>(ints.data());
  else if (name == "cross_block_race") cross_block_race<<<blocks, threads>>>(ints.data());
  else if (name == "divergent_barrier") divergent_barrier<<<1, threads>>>(ints.data());
  else if (name == "early_exit") early_exit<<<1, threads>>>(ints.data());
  else if (name == "deadlock") deadlock<<<1, threads>>>(ints.data());
  else if (name == "poisoned_read") poisoned_read<<<1, threads>>>(floats.data());
  else if (name == "overrun") {
    std::vector<int> exact(threads);
    overrun<<<1, threads>>>(exact.data());
  } else if (name == "warp_ops") {
    warp_ops<<<1, threads, threads * sizeof(int)>>>(ints.data());
    const std::vector<int> want = warp_ops_expected(threads);
    for (size_t i = 0; i < want.size(); ++i)
      if (ints[i] != want[i])
        std::printf("wrong value: thread %zu result %zu is %d, expected %d\n", i / kWarpOps, i % kWarpOps, ints[i],
                    want[i]);
  } else {
    std::fprintf(stderr, "unknown kernel %s\n", name.c_str());
    return 2;
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) std::printf("launch: %s\n", cudaGetErrorString(status));
  if (name == "poisoned_read")
    for (int t = 0; t < threads; ++t)
      if (!std::isnan(floats[t])) std::printf("thread %d read %g from unwritten shared memory\n", t, floats[t]);
  for (size_t i = 0; i < ntl_emu::report_count() && *ntl_emu::report(i); ++i) std::printf("%s\n", ntl_emu::report(i));
  ntl_emu::forget_memory();
  return 0;
}

int convert(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  FILE* out = std::fopen(out_path, "wb");
  if (!in || !out) return 2;
  float x;
  std::vector<uint16_t> half_bits, bf16_bits;
  while (std::fread(&x, sizeof x, 1, in) == 1) {
    half_bits.push_back(__float2half(x).__x);
    bf16_bits.push_back(__float2bfloat16(x).__x);
  }
  std::fwrite(half_bits.data(), 2, half_bits.size(), out);
  std::fwrite(bf16_bits.data(), 2, bf16_bits.size(), out);
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float h = __half2float(__half{uint16_t(bits)});
    std::fwrite(&h, sizeof h, 1, out);
  }
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float b = __bfloat162float(__nv_bfloat16{uint16_t(bits)});
    std::fwrite(&b, sizeof b, 1, out);
  }
  std::fclose(in);
  std::fclose(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "convert") return convert(argv[2], argv[3]);
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s KERNEL | convert IN OUT\n", argv[0]);
    return 2;
  }
  return run(argv[1]);
}
