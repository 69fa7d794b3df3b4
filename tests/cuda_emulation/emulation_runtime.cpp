// The runtime behind cuda_emulation.h: fibres for the threads of a block, block and warp barriers
// with their checks, shared memory poisoning, and (with NTL_EMU_RACECHECK, in the build whose
// kernel file is instrumented with -fsanitize=thread) the race checker fed by the __tsan_* hooks.
//
// Never instrumented itself: it is the code the hooks call.
#include <ucontext.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "cuda_emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define NTL_EMU_ASAN 1
#endif

namespace ntl_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;  // without cudaFuncSetAttribute, as on the GPU
constexpr size_t kStoredReports = 20;

enum class State { kReady, kBlockBarrier, kWarpBarrier, kExited };

struct Thread {
  ucontext_t context;
  void* stack = nullptr;
  State state = State::kReady;
  const char* file = nullptr;  // the barrier it waits at
  int line = 0;
  int kind = 0;       // block barrier: 0 plain, 1 or, 2 and, 3 count; warp: 0 shuffle, 1 vote
  int predicate = 0;  // block barrier predicate / vote predicate
  int result = 0;
  unsigned mask = 0;  // warp barrier
  int mode = 0, operand = 0, width = 32;
  size_t size = 0;
  unsigned char in[16], out[16];
#ifdef NTL_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Region {
  size_t size;
  std::string name;
  bool shared;  // per block: reset at every block start

  Region(size_t size_, std::string name_, bool shared_) : size(size_), name(std::move(name_)), shared(shared_) {
#ifdef NTL_EMU_RACECHECK
    cells.resize(size);
#endif
  }
#ifdef NTL_EMU_RACECHECK
  struct Cell {
    uint32_t write_epoch = 0, read_epoch = 0, atomic_epoch = 0;
    int32_t writer = -1, reader = -1, atomic = -1;  // thread ids; kMany: several threads
  };
  std::vector<Cell> cells;
#endif
};
constexpr int32_t kMany = -2;

struct Runtime {
  // The grid being run.
  LaunchConfig config{};
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  uint3 block{0, 0, 0};
  uint32_t block_serial = 0;  // counts blocks over the whole run
  int threads = 0;
  int current = -1;  // the running fibre, -1 on the scheduler
  std::vector<Thread> fibres = std::vector<Thread>(kMaxThreads);
  ucontext_t scheduler;
  bool aborted = false;  // a deadlock left this block's fibres blocked for good
#ifdef NTL_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
  std::unique_ptr<unsigned char[]> dynamic_smem;
  size_t static_smem = 0;
  Device device;
  std::map<const void*, size_t> dynamic_smem_limits;  // cudaFuncSetAttribute, per kernel

  // Memory the race checker follows: address -> region (shared regions of the current block
  // and the global buffers the driver registered).
  std::map<uintptr_t, Region> regions;
  uint32_t epoch = 0;             // one per barrier interval of every block
  std::vector<uint32_t> epoch_block;  // epoch -> block_serial
  uint32_t launch_first_epoch = 0;

  cudaError_t last_error = cudaSuccess;
  std::string skip_barrier;  // "file:line" of a barrier to leave out (NTL_EMU_SKIP_BARRIER)
  std::set<std::string> reached;
  std::string reached_text;
  size_t reports = 0;
  std::vector<std::string> stored;
  std::set<std::string> reported_keys;  // one race report per (region, kind) and launch
};

Runtime& rt() {
  static Runtime* runtime = [] {
    Runtime* r = new Runtime;
    if (const char* skip = std::getenv("NTL_EMU_SKIP_BARRIER")) r->skip_barrier = skip;
    return r;
  }();
  return *runtime;
}

const char* base_name(const char* file) {
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

std::string site(const char* file, int line) { return std::string(base_name(file)) + ":" + std::to_string(line); }

void add_report(const std::string& text) {
  Runtime& r = rt();
  ++r.reports;
  if (r.stored.size() < kStoredReports) r.stored.push_back(text);
}

std::string where() {
  const Runtime& r = rt();
  return "block (" + std::to_string(r.block.x) + "," + std::to_string(r.block.y) + "," + std::to_string(r.block.z) +
         ")";
}

// ------------------------------------------------------------------------------- fibres
void yield_to_scheduler(bool exiting) {
  Runtime& r = rt();
  Thread& self = r.fibres[r.current];
#ifdef NTL_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &self.fake_stack, r.scheduler_stack_bottom,
                                 r.scheduler_stack_size);
#endif
  swapcontext(&self.context, &r.scheduler);
#ifdef NTL_EMU_ASAN
  __sanitizer_finish_switch_fiber(self.fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

void fibre_main() {
  Runtime& r = rt();
#ifdef NTL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
  r.body(r.body_context);
  r.fibres[r.current].state = State::kExited;
  yield_to_scheduler(true);
}

void resume(int t) {
  Runtime& r = rt();
  Thread& fibre = r.fibres[t];
  r.current = t;
#ifdef NTL_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, fibre.stack, kStackBytes);
#endif
  swapcontext(&r.scheduler, &fibre.context);
#ifdef NTL_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
  r.current = -1;
}

void start_fibre(int t) {
  Thread& fibre = rt().fibres[t];
  if (!fibre.stack) {
    fibre.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (fibre.stack == MAP_FAILED) {
      std::perror("ntl_emu: fibre stack");
      std::abort();
    }
  }
  getcontext(&fibre.context);
  fibre.context.uc_stack.ss_sp = fibre.stack;
  fibre.context.uc_stack.ss_size = kStackBytes;
  fibre.context.uc_link = nullptr;
  makecontext(&fibre.context, fibre_main, 0);
  fibre.state = State::kReady;
}

// ------------------------------------------------------------------------------- barriers
std::string thread_list(const std::vector<int>& ids) {
  std::string text;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) text += (i ? "," : "") + std::to_string(ids[i]);
  if (ids.size() > 8) text += ",... (" + std::to_string(ids.size()) + " threads)";
  return text;
}

void new_epoch() {
  Runtime& r = rt();
  ++r.epoch;
  r.epoch_block.resize(r.epoch + 1);
  r.epoch_block[r.epoch] = r.block_serial;
}

// All live threads wait at a block barrier: check that it is the same one, release them.
void complete_block_barrier() {
  Runtime& r = rt();
  std::vector<int> waiting, exited;
  std::map<std::string, std::vector<int>> sites;
  for (int t = 0; t < r.threads; ++t) {
    const Thread& f = r.fibres[t];
    if (f.state == State::kExited) {
      exited.push_back(t);
    } else {
      waiting.push_back(t);
      sites[site(f.file, f.line)].push_back(t);
    }
  }
  if (sites.size() > 1) {
    std::string text = "divergent __syncthreads in " + where() + ":";
    for (const auto& [where_, ids] : sites) text += " threads " + thread_list(ids) + " at " + where_ + ";";
    add_report(text);
  }
  if (!exited.empty()) {
    add_report("threads " + thread_list(exited) + " exited while threads " + thread_list(waiting) +
               " wait at __syncthreads " + sites.begin()->first + " in " + where());
  }
  int count = 0;
  for (int t : waiting) count += r.fibres[t].predicate;
  for (int t : waiting) {
    Thread& f = r.fibres[t];
    f.result = f.kind == 1 ? count > 0 : f.kind == 2 ? count == int(waiting.size()) : count;
    f.state = State::kReady;
  }
  new_epoch();
}

int lane_source(const Thread& f, int lane) {
  const int w = f.width, segment = lane & ~(w - 1);
  switch (f.mode) {
    case kShflIdx: return segment + (f.operand & (w - 1));
    case kShflUp: return (lane - segment) < f.operand ? lane : lane - f.operand;
    case kShflDown: return (lane - segment) + f.operand >= w ? lane : lane + f.operand;
    default: {
      const int source = lane ^ f.operand;
      return (source & ~(w - 1)) == segment ? source : lane;
    }
  }
}

// Complete warp barriers whose every lane named in the mask has arrived. Returns whether any did.
bool complete_warp_barriers() {
  Runtime& r = rt();
  bool any = false;
  for (int base = 0; base < r.threads; base += 32) {
    int first = -1;
    for (int t = base; t < base + 32 && t < r.threads; ++t)
      if (r.fibres[t].state == State::kWarpBarrier) {
        first = t;
        break;
      }
    if (first < 0) continue;
    const Thread& lead = r.fibres[first];
    bool complete = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(lead.mask >> lane & 1u)) continue;
      const int t = base + lane;
      if (t >= r.threads) {
        add_report("warp operation at " + site(lead.file, lead.line) + " names lane " + std::to_string(lane) +
                   " of warp " + std::to_string(base / 32) + ", which does not exist, in " + where());
        continue;
      }
      if (r.fibres[t].state != State::kWarpBarrier) complete = false;
    }
    if (!complete) continue;
    for (int lane = 0; lane < 32 && base + lane < r.threads; ++lane) {
      const Thread& f = r.fibres[base + lane];
      if (f.state != State::kWarpBarrier) continue;
      if (f.line != lead.line || std::strcmp(f.file, lead.file) != 0 || f.mask != lead.mask || f.kind != lead.kind)
        add_report("divergent warp operation in " + where() + ": thread " + std::to_string(base + lane) + " at " +
                   site(f.file, f.line) + ", thread " + std::to_string(first) + " at " + site(lead.file, lead.line));
    }
    unsigned ballot = 0;
    for (int lane = 0; lane < 32 && base + lane < r.threads; ++lane) {
      const Thread& f = r.fibres[base + lane];
      if (f.state == State::kWarpBarrier && (lead.mask >> lane & 1u) && f.predicate) ballot |= 1u << lane;
    }
    std::vector<int> released;
    for (int lane = 0; lane < 32 && base + lane < r.threads; ++lane) {
      Thread& f = r.fibres[base + lane];
      if (f.state != State::kWarpBarrier || !(lead.mask >> lane & 1u)) continue;
      released.push_back(base + lane);
      if (f.kind == 0) {
        const int source = lane_source(f, lane);
        const Thread& from = r.fibres[base + source];
        if (!(f.mask >> source & 1u) || base + source >= r.threads || from.state != State::kWarpBarrier)
          add_report("shuffle at " + site(f.file, f.line) + " in " + where() + ": lane " + std::to_string(lane) +
                     " reads lane " + std::to_string(source) + ", which does not take part");
        std::memcpy(f.out, from.in, f.size);
      } else {
        f.result = int(ballot);
      }
    }
    for (int t : released) r.fibres[t].state = State::kReady;
    any = true;
  }
  return any;
}

void report_deadlock() {
  Runtime& r = rt();
  std::map<std::string, std::vector<int>> states;
  for (int t = 0; t < r.threads; ++t) {
    const Thread& f = r.fibres[t];
    if (f.state == State::kExited) states["exited"].push_back(t);
    else if (f.state == State::kBlockBarrier) states["__syncthreads " + site(f.file, f.line)].push_back(t);
    else states["warp operation " + site(f.file, f.line)].push_back(t);
  }
  std::string text = "deadlock in " + where() + ":";
  for (const auto& [state, ids] : states) text += " threads " + thread_list(ids) + " " + state + ";";
  add_report(text);
}

// Runs every fibre of the block until all have returned (or a deadlock stops them).
void run_block() {
  Runtime& r = rt();
  ++r.block_serial;
  new_epoch();
  // Shared memory is per block: last block's shared regions go; the dynamic one is re-poisoned.
  for (auto it = r.regions.begin(); it != r.regions.end();) it = it->second.shared ? r.regions.erase(it) : ++it;
  r.static_smem = 0;
  if (r.config.dynamic_smem) {
    std::memset(r.dynamic_smem.get(), 0xff, r.config.dynamic_smem);
    Region region{r.config.dynamic_smem, "extern __shared__ (dynamic)", true};
    r.regions.emplace(reinterpret_cast<uintptr_t>(r.dynamic_smem.get()), std::move(region));
  }
  for (int t = 0; t < r.threads; ++t) start_fibre(t);
  // Threads run in increasing order in even blocks and in decreasing order in odd ones, so that
  // a missing barrier shows as a wrong result (a read of poison) in one order or the other even
  // where no race checker runs.
  const bool descending = r.block_serial % 2 == 0;
  while (true) {
    bool ran = false;
    for (int i = 0; i < r.threads; ++i) {
      const int t = descending ? r.threads - 1 - i : i;
      if (r.fibres[t].state != State::kReady) continue;
      resume(t);
      ran = true;
    }
    if (ran) continue;
    int live = 0, at_block = 0;
    for (int t = 0; t < r.threads; ++t) {
      live += r.fibres[t].state != State::kExited;
      at_block += r.fibres[t].state == State::kBlockBarrier;
    }
    if (live == 0) break;
    if (at_block == live) {
      complete_block_barrier();
      continue;
    }
    if (complete_warp_barriers()) continue;
    report_deadlock();
    r.aborted = true;
    break;
  }
  // Without opting in, 48 KiB in all; with it, the device's opt-in limit in all.
  const bool opted_in = r.config.dynamic_smem_limit > kStaticSharedLimit;
  const size_t limit = opted_in ? size_t(r.device.smem_optin) : kStaticSharedLimit;
  if (r.static_smem + r.config.dynamic_smem > limit)
    add_report("the block uses " + std::to_string(r.static_smem + r.config.dynamic_smem) +
               " bytes of shared memory, over the " + std::to_string(limit) +
               (opted_in ? " bytes of the device's opt-in limit" : " bytes a launch gets without opting in"));
}

Thread& waiting_thread(const char* file, int line) {
  Runtime& r = rt();
  if (r.current < 0) {
    std::fprintf(stderr, "ntl_emu: a barrier at %s called outside a kernel\n", site(file, line).c_str());
    std::abort();
  }
  Thread& self = r.fibres[r.current];
  self.file = file;
  self.line = line;
  return self;
}

}  // namespace

// ------------------------------------------------------------------------------- the header's API
uint3 thread_idx() {
  const Runtime& r = rt();
  const unsigned t = unsigned(r.current), x = r.config.block.x, y = r.config.block.y;
  return uint3{t % x, (t / x) % y, t / (x * y)};
}
uint3 block_idx() { return rt().block; }
dim3 block_dim() { return rt().config.block; }
dim3 grid_dim() { return rt().config.grid; }

int syncthreads(const char* file, int line, int kind, int predicate) {
  Runtime& r = rt();
  const std::string here = site(file, line);
  if (r.reached.insert(here).second) r.reached_text += (r.reached_text.empty() ? "" : ";") + here;
  if (here == r.skip_barrier) {
    return predicate;  // left out: no wait; the thread sees its own predicate
  }
  Thread& self = waiting_thread(file, line);
  self.state = State::kBlockBarrier;
  self.kind = kind;
  self.predicate = predicate;
  yield_to_scheduler(false);
  return self.result;
}

void warp_exchange(const char* file, int line, unsigned mask, const void* in, void* out, size_t size, int mode,
                   int operand, int width) {
  Thread& self = waiting_thread(file, line);
  if (width <= 0 || width > 32 || (width & (width - 1)))
    add_report("shuffle at " + site(file, line) + " with width " + std::to_string(width));
  const int lane = rt().current % 32;
  if (!(mask >> lane & 1u)) add_report("shuffle at " + site(file, line) + " by a lane missing from its mask");
  self.state = State::kWarpBarrier;
  self.kind = 0;
  self.mask = mask;
  self.mode = mode;
  self.operand = operand;
  self.width = (width <= 0 || width > 32 || (width & (width - 1))) ? 32 : width;
  self.size = size;
  std::memcpy(self.in, in, size);
  yield_to_scheduler(false);
  std::memcpy(out, self.out, size);
}

unsigned warp_vote(const char* file, int line, unsigned mask, int predicate) {
  Thread& self = waiting_thread(file, line);
  self.state = State::kWarpBarrier;
  self.kind = 1;
  self.mask = mask;
  self.predicate = predicate;
  yield_to_scheduler(false);
  return unsigned(self.result);
}

void register_shared(void* address, size_t size, const char* name, const char* file, int line) {
  Runtime& r = rt();
  const uintptr_t key = reinterpret_cast<uintptr_t>(address);
  if (r.regions.count(key)) return;  // another thread of this block declared it first
  std::memset(address, 0xff, size);  // poison: NaN in floating point, -1 in integers
  Region region{size, std::string("__shared__ ") + name + " (" + site(file, line) + ")", true};
  r.regions.emplace(key, std::move(region));
  r.static_smem += size;
}

unsigned char* dynamic_shared_memory() { return rt().dynamic_smem.get(); }

Device& device() { return rt().device; }

void set_device(const Device& d) {
  rt().device = d;
  rt().dynamic_smem_limits.clear();
}

cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > rt().device.smem_optin) return cudaErrorInvalidValue;
  rt().dynamic_smem_limits[kernel] = size_t(bytes);
  return cudaSuccess;
}

size_t dynamic_smem_limit(const void* kernel) {
  const auto it = rt().dynamic_smem_limits.find(kernel);
  return it == rt().dynamic_smem_limits.end() ? kStaticSharedLimit : it->second;
}

void run_grid(const LaunchConfig& config, void (*body)(void*), void* context) {
  Runtime& r = rt();
  const dim3 g = config.grid, b = config.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (!g.x || !g.y || !g.z || !threads || threads > kMaxThreads || b.z > 64) {
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (config.dynamic_smem > config.dynamic_smem_limit) {
    r.last_error = cudaErrorInvalidValue;
    return;
  }
  r.config = config;
  r.body = body;
  r.body_context = context;
  r.threads = int(threads);
  r.aborted = false;
  r.launch_first_epoch = r.epoch + 1;
  r.reported_keys.clear();
  r.dynamic_smem.reset(config.dynamic_smem ? new unsigned char[config.dynamic_smem] : nullptr);
  for (unsigned z = 0; z < g.z && !r.aborted; ++z)
    for (unsigned y = 0; y < g.y && !r.aborted; ++y)
      for (unsigned x = 0; x < g.x && !r.aborted; ++x) {
        r.block = uint3{x, y, z};
        run_block();
      }
  if (r.aborted) r.last_error = cudaErrorLaunchFailure;
  for (auto it = r.regions.begin(); it != r.regions.end();) it = it->second.shared ? r.regions.erase(it) : ++it;
  r.dynamic_smem.reset();
}

cudaError_t take_last_error() {
  const cudaError_t error = rt().last_error;
  rt().last_error = cudaSuccess;
  return error;
}

const char* error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void track_memory(const void* address, size_t size, const char* name) {
  if (!size) return;
  Region region{size, name, false};
  auto& regions = rt().regions;
  const uintptr_t key = reinterpret_cast<uintptr_t>(address);
  regions.erase(key);
  regions.emplace(key, std::move(region));
}

void forget_memory() {
  Runtime& r = rt();
  r.regions.clear();
  r.reports = 0;
  r.stored.clear();
}

size_t report_count() { return rt().reports; }
const char* report(size_t i) { return i < rt().stored.size() ? rt().stored[i].c_str() : ""; }
const char* barriers_reached() { return rt().reached_text.c_str(); }

// ------------------------------------------------------------------------------- race checker
#ifdef NTL_EMU_RACECHECK
namespace {

enum Access { kRead, kWrite, kAtomic };

void race(const Region& region, size_t offset, const char* what, int32_t other, uint32_t other_epoch) {
  Runtime& r = rt();
  const std::string key = region.name + what;
  if (!r.reported_keys.insert(key).second) {
    ++r.reports;
    return;
  }
  const bool other_block = r.epoch_block[other_epoch] != r.block_serial;
  add_report(std::string("race on ") + region.name + " byte " + std::to_string(offset) + ": " + what + " by thread " +
             std::to_string(r.current) + " of " + where() + ", after " +
             (other == kMany ? std::string("several threads") : "thread " + std::to_string(other)) +
             (other_block ? " of another block" : " in the same barrier interval"));
}

// Whether an earlier access (epoch, thread) conflicts with the running thread now.
bool conflicts(uint32_t epoch, int32_t thread) {
  const Runtime& r = rt();
  if (epoch < r.launch_first_epoch || thread == -1) return false;  // an earlier launch, or none
  if (r.epoch_block[epoch] != r.block_serial) return true;         // blocks never synchronise
  return epoch == r.epoch && thread != r.current;
}

void note(int32_t& thread, uint32_t& epoch) {
  const Runtime& r = rt();
  if (epoch == r.epoch && thread != r.current) {
    thread = kMany;
  } else if (epoch != r.epoch) {
    epoch = r.epoch;
    thread = r.current;
  }
}

void check(const void* address, size_t size, Access kind) {
  Runtime& r = rt();
  if (r.current < 0 || r.regions.empty()) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  auto it = r.regions.upper_bound(a);
  if (it == r.regions.begin()) return;
  --it;
  if (a >= it->first + it->second.size) return;
  Region& region = it->second;
  const size_t first = a - it->first, last = std::min(first + size, region.size);
  for (size_t i = first; i < last; ++i) {
    Region::Cell& c = region.cells[i];
    if (kind != kAtomic && conflicts(c.atomic_epoch, c.atomic)) race(region, i, "plain access after atomic", c.atomic, c.atomic_epoch);
    if (conflicts(c.write_epoch, c.writer))
      race(region, i, kind == kWrite ? "write after write" : kind == kRead ? "read after write" : "atomic after write",
           c.writer, c.write_epoch);
    if (kind != kRead && conflicts(c.read_epoch, c.reader))
      race(region, i, kind == kWrite ? "write after read" : "atomic after read", c.reader, c.read_epoch);
    if (kind == kRead) note(c.reader, c.read_epoch);
    else if (kind == kWrite) {
      c.writer = r.current;
      c.write_epoch = r.epoch;
    } else note(c.atomic, c.atomic_epoch);
  }
}

}  // namespace

void note_atomic(void* address, size_t size) { check(address, size, kAtomic); }
#else
void note_atomic(void*, size_t) {}
#endif

}  // namespace ntl_emu

#ifdef NTL_EMU_RACECHECK
// The hooks GCC's -fsanitize=thread instrumentation calls; the kernel file alone is instrumented.
extern "C" {
#define NTL_EMU_HOOKS(n)                                                                              \
  void __tsan_read##n(void* p) { ntl_emu::check(p, n, ntl_emu::kRead); }                              \
  void __tsan_write##n(void* p) { ntl_emu::check(p, n, ntl_emu::kWrite); }                            \
  void __tsan_unaligned_read##n(void* p) { ntl_emu::check(p, n, ntl_emu::kRead); }                    \
  void __tsan_unaligned_write##n(void* p) { ntl_emu::check(p, n, ntl_emu::kWrite); }
NTL_EMU_HOOKS(1)
NTL_EMU_HOOKS(2)
NTL_EMU_HOOKS(4)
NTL_EMU_HOOKS(8)
NTL_EMU_HOOKS(16)
#undef NTL_EMU_HOOKS
void __tsan_read_range(void* p, size_t n) { ntl_emu::check(p, n, ntl_emu::kRead); }
void __tsan_write_range(void* p, size_t n) { ntl_emu::check(p, n, ntl_emu::kWrite); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
#endif
