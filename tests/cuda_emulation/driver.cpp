// Runs the CUDA kernels of csrc/cuda/ntl_kernels.cu, compiled as host code with cuda_emulation.h,
// on the cases harness.py writes, through the kernels' own launch functions (so with the launch
// configuration ntl_cuda.cpp uses), and writes what they computed.
//
//   driver CASES_FILE RESULTS_FILE
//
// File format (little endian), both ways: "NTLEMU01", u32 record count, then per record a u32
// field count and per field: u16 name length, name, u8 dtype (0 f32, 1 bf16, 2 f16, 3 f64, 4 i32,
// 5 i64, 6 u8), u64 element count, the raw elements. A case names its kernel in the field
// "kernel" (one of kKernels below); a result holds the kernel's outputs, "error" (a failed
// launch), "reports" (what the emulation found: races, barrier faults) and "barriers" (every
// barrier executed so far, "file:line;...").
//
// Every buffer is its own exact-size heap allocation (AddressSanitizer sees an overrun by one
// element), filled with 0xFF bytes where the kernel should write (an unwritten output reads NaN);
// with "misaligned", each starts one element past a poisoned slot, off 16-byte alignment.
//
// Optional fields of a case: "device_smem_optin", "device_l2", "device_sms" (the emulated
// device's attributes; an H100-like device otherwise), "rows_in_flight" and "row_in_smem" (the
// environment variables NTL_FAST_CUDA_ROWS_IN_FLIGHT / NTL_FAST_CUDA_ROW_IN_SMEM the one-pass
// launch reads; unset otherwise).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emulation.h"
#include "ntl_kernels.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace {

enum Dtype : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5, kU8 = 6 };

size_t element_size(uint8_t dtype) {
  static const size_t sizes[] = {4, 2, 2, 8, 4, 8, 1};
  if (dtype > kU8) throw std::runtime_error("unknown dtype code " + std::to_string(dtype));
  return sizes[dtype];
}

struct Field {
  uint8_t dtype;
  uint64_t count;
  std::vector<unsigned char> bytes;
};
using Record = std::map<std::string, Field>;

// ------------------------------------------------------------------------------- file format
template <typename T>
T read_value(FILE* f) {
  T value;
  if (std::fread(&value, sizeof value, 1, f) != 1) throw std::runtime_error("truncated cases file");
  return value;
}

std::vector<Record> read_records(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  char magic[8];
  if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "NTLEMU01", 8) != 0)
    throw std::runtime_error("not a cases file");
  std::vector<Record> records(read_value<uint32_t>(f));
  for (Record& record : records) {
    const uint32_t fields = read_value<uint32_t>(f);
    for (uint32_t i = 0; i < fields; ++i) {
      std::string name(read_value<uint16_t>(f), '\0');
      if (std::fread(name.data(), 1, name.size(), f) != name.size()) throw std::runtime_error("truncated name");
      Field field;
      field.dtype = read_value<uint8_t>(f);
      field.count = read_value<uint64_t>(f);
      field.bytes.resize(field.count * element_size(field.dtype));
      if (!field.bytes.empty() && std::fread(field.bytes.data(), 1, field.bytes.size(), f) != field.bytes.size())
        throw std::runtime_error("truncated field " + name);
      record[name] = std::move(field);
    }
  }
  std::fclose(f);
  return records;
}

void write_records(const char* path, const std::vector<Record>& records) {
  FILE* f = std::fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("cannot write ") + path);
  const uint32_t n = uint32_t(records.size());
  std::fwrite("NTLEMU01", 1, 8, f);
  std::fwrite(&n, sizeof n, 1, f);
  for (const Record& record : records) {
    const uint32_t fields = uint32_t(record.size());
    std::fwrite(&fields, sizeof fields, 1, f);
    for (const auto& [name, field] : record) {
      const uint16_t length = uint16_t(name.size());
      std::fwrite(&length, sizeof length, 1, f);
      std::fwrite(name.data(), 1, name.size(), f);
      std::fwrite(&field.dtype, 1, 1, f);
      std::fwrite(&field.count, sizeof field.count, 1, f);
      if (!field.bytes.empty()) std::fwrite(field.bytes.data(), 1, field.bytes.size(), f);
    }
  }
  std::fclose(f);
}

Field text_field(const std::string& text) { return Field{kU8, text.size(), {text.begin(), text.end()}}; }

// The emulated device and the launch environment a case asks for (see the top of the file).
void configure_device(const Record& c) {
  ntl_emu::Device d;
  const auto field = [&c](const char* name, int* into) {
    const auto it = c.find(name);
    if (it == c.end()) return;
    int64_t v;
    if (it->second.dtype != kI64 || it->second.count != 1) throw std::runtime_error(std::string(name) + ": one int64");
    std::memcpy(&v, it->second.bytes.data(), sizeof v);
    *into = int(v);
  };
  field("device_smem_optin", &d.smem_optin);
  field("device_l2", &d.l2_bytes);
  field("device_sms", &d.sms);
  ntl_emu::set_device(d);
  using Variable = std::pair<const char*, const char*>;  // case field, environment variable
  for (const auto& [key, variable] : {Variable{"rows_in_flight", "NTL_FAST_CUDA_ROWS_IN_FLIGHT"},
                                      Variable{"row_in_smem", "NTL_FAST_CUDA_ROW_IN_SMEM"}}) {
    int value = -1;
    field(key, &value);
    if (value >= 0)
      setenv(variable, std::to_string(value).c_str(), 1);
    else
      unsetenv(variable);
  }
}

// ------------------------------------------------------------------------------- device buffers
// One exact-size allocation per buffer, registered with the race checker under its name.
class Buffer {
 public:
  Buffer(const char* name, uint8_t dtype, uint64_t count, bool misaligned)
      : slack_(misaligned ? element_size(dtype) : 0),
        bytes_(count * element_size(dtype)),
        storage_(new unsigned char[slack_ + bytes_]),
        dtype_(dtype) {
    std::memset(storage_.get(), 0xff, slack_ + bytes_);
#if defined(__SANITIZE_ADDRESS__)
    ASAN_POISON_MEMORY_REGION(storage_.get(), slack_);
#endif
    ntl_emu::track_memory(data(), bytes_, name);
  }
  Buffer(const char* name, const Field& from, bool misaligned) : Buffer(name, from.dtype, from.count, misaligned) {
    if (bytes_) std::memcpy(data(), from.bytes.data(), bytes_);
  }
  ~Buffer() {
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(storage_.get(), slack_);
#endif
  }
  unsigned char* data() const { return storage_.get() + slack_; }
  Field field() const { return Field{dtype_, bytes_ / element_size(dtype_), {data(), data() + bytes_}}; }

 private:
  size_t slack_, bytes_;
  std::unique_ptr<unsigned char[]> storage_;
  uint8_t dtype_;
};

const Field& need(const Record& c, const std::string& name) {
  const auto it = c.find(name);
  if (it == c.end()) throw std::runtime_error("case lacks field " + name);
  return it->second;
}

template <typename T>
T scalar(const Record& c, const std::string& name) {
  const Field& f = need(c, name);
  if (f.count != 1) throw std::runtime_error(name + " must hold one element");
  if (f.dtype == kF64) {
    double v;
    std::memcpy(&v, f.bytes.data(), sizeof v);
    return T(v);
  }
  if (f.dtype != kI64) throw std::runtime_error(name + " must be float64 or int64");
  int64_t v;
  std::memcpy(&v, f.bytes.data(), sizeof v);
  return T(v);
}

// The inputs every kernel of ntl_kernels.cu reads, as ntl_cuda.cpp's make_rows fills them.
struct Launch {
  bool misaligned;
  std::vector<std::unique_ptr<Buffer>> owned;
  ntl::CudaRows rows{};

  Buffer& input(const Record& c, const char* name) {
    owned.push_back(std::make_unique<Buffer>(name, need(c, name), misaligned));
    return *owned.back();
  }
  Buffer& output(const char* name, uint8_t dtype, uint64_t count) {
    owned.push_back(std::make_unique<Buffer>(name, dtype, count, misaligned));
    return *owned.back();
  }

  explicit Launch(const Record& c) : misaligned(scalar<int64_t>(c, "misaligned") != 0) {
    const Field& logits = need(c, "logits");
    rows.dtype = logits.dtype;
    rows.M = scalar<int64_t>(c, "M");
    rows.V = scalar<int64_t>(c, "V");
    rows.K = int64_t(need(c, "number_ids").count);
    if (logits.count != uint64_t(rows.M * rows.V)) throw std::runtime_error("logits must hold M * V elements");
    rows.logits = input(c, "logits").data();
    const Field& labels = need(c, "labels");
    rows.labels_int32 = labels.dtype == kI32;
    rows.labels = input(c, "labels").data();
    rows.number_ids = reinterpret_cast<const int64_t*>(input(c, "number_ids").data());
    rows.number_values = reinterpret_cast<const float*>(input(c, "number_values").data());
    rows.number_index = reinterpret_cast<const int64_t*>(input(c, "number_index").data());
    rows.value_order = reinterpret_cast<const int64_t*>(input(c, "value_order").data());
    rows.sorted_gaps = reinterpret_cast<const float*>(input(c, "sorted_gaps").data());
    rows.with_ce = scalar<int64_t>(c, "with_ce") != 0;
    ntl::Options& o = rows.options;
    o.loss = scalar<int>(c, "loss");
    o.squash = scalar<int64_t>(c, "squash") != 0;
    o.squash_min = scalar<double>(c, "squash_min");
    o.squash_scale = scalar<double>(c, "squash_scale");
    o.reweigh = scalar<int64_t>(c, "reweigh") != 0;
    o.reweigh_constant = scalar<double>(c, "reweigh_constant");
    o.gaussian = scalar<int64_t>(c, "gaussian") != 0;
    o.sigma = scalar<double>(c, "sigma");
    o.ignore_index = scalar<int64_t>(c, "ignore_index");
  }
  uint8_t acc() const { return rows.dtype == kF64 ? kF64 : kF32; }
  // The number-token workspace of the backward and one-pass kernels: as ntl_cuda.cpp allocates it
  // (always 8-byte aligned, uninitialised: 0xFF bytes, NaN where a kernel reads before writing),
  // or with room for "workspace_rows" rows only (the rows then go through it in several chunks).
  void workspace(const Record& c) {
    int64_t room = rows.M;
    if (c.count("workspace_rows")) room = std::min(room, scalar<int64_t>(c, "workspace_rows"));
    rows.workspace_size = ntl::workspace_bytes(rows.dtype, room, rows.K);
    owned.push_back(std::make_unique<Buffer>("workspace", kF64, (rows.workspace_size + 7) / 8, false));
    rows.workspace = owned.back()->data();
  }
};

void finish(cudaError_t status, Record& out) {
  if (status != cudaSuccess) out["error"] = text_field(cudaGetErrorString(status));
}

void run_forward(const Record& c, Record& out) {
  Launch l(c);
  Buffer* ce = l.rows.with_ce ? &l.output("ce", l.acc(), l.rows.M) : nullptr;
  Buffer& ntl = l.output("ntl", l.acc(), l.rows.M);
  Buffer& row_stats = l.output("row_stats", l.acc(), l.rows.M * 5);
  l.rows.ce = ce ? ce->data() : nullptr;
  l.rows.ntl = ntl.data();
  l.rows.row_stats = row_stats.data();
  finish(ntl::launch_forward(l.rows, nullptr), out);
  if (ce) out["ce"] = ce->field();
  out["ntl"] = ntl.field();
  out["row_stats"] = row_stats.field();
}

// The backward into a fresh buffer (ntl_backward, ce_ntl_backward) or over the logits
// (ce_ntl_backward_), from the forward's saved rows and the upstream gradients.
template <bool kInPlace>
void run_backward(const Record& c, Record& out) {
  Launch l(c);
  if (kInPlace && !l.rows.with_ce) throw std::runtime_error("the in-place backward is CE+NTL only");
  l.rows.row_stats = l.input(c, "row_stats").data();
  l.rows.grad_ce = l.rows.with_ce ? l.input(c, "grad_ce").data() : nullptr;
  l.rows.grad_ntl = l.input(c, "grad_ntl").data();
  l.workspace(c);
  Buffer* grad = kInPlace ? l.owned.front().get() : &l.output("grad_logits", uint8_t(l.rows.dtype), l.rows.M * l.rows.V);
  l.rows.grad_logits = grad->data();
  finish(ntl::launch_backward(l.rows, nullptr), out);
  out["grad"] = grad->field();
}

// Loss and gradient in one pass (ce_ntl_loss_and_grad): ce, ntl and the gradient of
// Σ ce_scale·ce + Σ ntl_scale·ntl, into a fresh buffer or over the logits. The per-row scales
// travel in the fields "grad_ce" / "grad_ntl".
template <bool kInPlace>
void run_loss_and_grad(const Record& c, Record& out) {
  Launch l(c);
  if (!l.rows.with_ce) throw std::runtime_error("the one-pass kernel computes CE and NTL");
  l.rows.ce_scale = l.input(c, "grad_ce").data();
  l.rows.ntl_scale = l.input(c, "grad_ntl").data();
  l.workspace(c);
  Buffer& ce = l.output("ce", l.acc(), l.rows.M);
  Buffer& ntl = l.output("ntl", l.acc(), l.rows.M);
  l.rows.ce = ce.data();
  l.rows.ntl = ntl.data();
  Buffer* grad = kInPlace ? l.owned.front().get() : &l.output("grad_logits", uint8_t(l.rows.dtype), l.rows.M * l.rows.V);
  l.rows.grad_logits = grad->data();
  ntl::OnePassPlan plan{};
  finish(ntl::plan_loss_and_grad(l.rows, &plan), out);
  const int64_t planned[2] = {plan.staged ? 1 : 0, plan.blocks};
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(planned);
  out["plan"] = Field{kI64, 2, {bytes, bytes + sizeof planned}};  // staged, blocks
  finish(ntl::launch_loss_and_grad(l.rows, nullptr), out);
  out["ce"] = ce.field();
  out["ntl"] = ntl.field();
  out["grad"] = grad->field();
}

// grad *= grad_output in place over the logits' buffer (the field "grad_output": one value of
// the accumulation type).
void run_scale_gradient(const Record& c, Record& out) {
  Launch l(c);
  Buffer& grad = *l.owned.front();
  const void* grad_output = l.input(c, "grad_output").data();
  finish(ntl::launch_scale_gradient(grad.data(), l.rows.dtype, l.rows.M * l.rows.V, grad_output, nullptr), out);
  out["grad"] = grad.field();
}

// A kernel of ntl_kernels.cu as the cases name it: a new kernel is one more line here (and its
// reference in harness.py).
struct KernelEntry {
  const char* name;
  void (*run)(const Record&, Record&);
};
const KernelEntry kKernels[] = {
    {"forward", run_forward},
    {"backward", run_backward<false>},
    {"backward_inplace", run_backward<true>},
    {"loss_and_grad", run_loss_and_grad<false>},
    {"loss_and_grad_inplace", run_loss_and_grad<true>},
    {"scale_gradient", run_scale_gradient},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASES_FILE RESULTS_FILE\n", argv[0]);
    return 2;
  }
  try {
    const std::vector<Record> cases = read_records(argv[1]);
    std::vector<Record> results(cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      const Field& kernel = need(cases[i], "kernel");
      const std::string name(kernel.bytes.begin(), kernel.bytes.end());
      const KernelEntry* entry = nullptr;
      for (const KernelEntry& e : kKernels)
        if (name == e.name) entry = &e;
      if (!entry) throw std::runtime_error("unknown kernel '" + name + "'");
      ntl_emu::forget_memory();
      configure_device(cases[i]);
      entry->run(cases[i], results[i]);
      std::string reports;
      for (size_t r = 0; r < ntl_emu::report_count() && *ntl_emu::report(r); ++r) reports += ntl_emu::report(r) + std::string("\n");
      results[i]["reports"] = text_field(reports);
      const int64_t count = int64_t(ntl_emu::report_count());
      results[i]["report_count"] = Field{kI64, 1, {reinterpret_cast<const unsigned char*>(&count),
                                                   reinterpret_cast<const unsigned char*>(&count) + sizeof count}};
      results[i]["barriers"] = text_field(ntl_emu::barriers_reached());
    }
    ntl_emu::forget_memory();
    write_records(argv[2], results);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "driver: %s\n", error.what());
    return 1;
  }
  return 0;
}
