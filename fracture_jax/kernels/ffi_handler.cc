// The XLA FFI handler of fracture_jax's native kernels (fracture_jax/kernels/ffi.py).
//
// Written against the FFI headers that jaxlib ships (jax.ffi.include_dir()): the handler's
// binding, the call frame's layout and the API version it reports come from those headers, so
// a jaxlib whose FFI changed incompatibly refuses the handler at registration.
//
// A plan is a list of steps built once, when a program is traced (ffi.py), and run here on
// XLA's buffers with no Python and no GIL: a step runs a oneDNN primitive or a C function of
// this package, on the call's arguments, its results or scratch buffers the plan allocates
// per call. One plan runs at a time: each already spans every core, and oneDNN shares one
// scratchpad between primitives when several (faked) CPU devices call at once.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// oneDNN 3's C API, as oneapi/dnnl/dnnl.h declares it (handles are pointers, statuses ints).
struct dnnl_exec_arg_t {
  int arg;
  void *memory;
};
using MemoryCreate = int (*)(void **memory, const void *desc, void *engine, void *handle);
using MemoryDestroy = int (*)(void *memory);
using PrimitiveExecute = int (*)(const void *primitive, void *stream, int nargs,
                                 const dnnl_exec_arg_t *args);
using StreamWait = int (*)(void *stream);

struct Dnnl {
  MemoryCreate memory_create = nullptr;
  MemoryDestroy memory_destroy = nullptr;
  PrimitiveExecute primitive_execute = nullptr;
  StreamWait stream_wait = nullptr;
  void *engine = nullptr, *stream = nullptr;
};

// A C function step: (source, destination, four sizes) -> nonzero on failure.
using Function = int (*)(const void *, void *, long, long, long, long);

enum Kind : int32_t { kArgument = 0, kResult = 1, kScratch = 2 };

struct Ref {
  int32_t kind, index;
};

struct Step {
  bool onednn = false;              // a oneDNN step, running `primitive`, or
  const void *primitive = nullptr;
  Function function = nullptr;      // a C function step
  std::vector<int32_t> args;        // oneDNN: the argument numbers (DNNL_ARG_*),
  std::vector<const void *> descs;  // their memory descriptors and
  std::vector<Ref> refs;            // their buffers; a function: source and destination
  long sizes[4] = {0, 0, 0, 0};
};

struct Plan {
  std::vector<size_t> scratch;  // bytes of each scratch buffer
  std::vector<Step> steps;
};

static Dnnl dnnl;
static std::deque<Plan> plans;  // grows at the back; a plan never moves
static std::mutex plans_mutex, run_mutex;

extern "C" {

void fj_set_onednn(void *memory_create, void *memory_destroy, void *primitive_execute,
                   void *stream_wait, void *engine, void *stream) {
  dnnl = Dnnl{reinterpret_cast<MemoryCreate>(memory_create),
              reinterpret_cast<MemoryDestroy>(memory_destroy),
              reinterpret_cast<PrimitiveExecute>(primitive_execute),
              reinterpret_cast<StreamWait>(stream_wait), engine, stream};
}

int64_t fj_plan_new() {
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans.emplace_back();
  return static_cast<int64_t>(plans.size()) - 1;
}

// Adds a scratch buffer of `bytes` to plan `plan`; returns its index.
int32_t fj_plan_scratch(int64_t plan, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans[plan].scratch.push_back(bytes);
  return static_cast<int32_t>(plans[plan].scratch.size()) - 1;
}

void fj_plan_onednn(int64_t plan, const void *primitive, int32_t count, const int32_t *args,
                    const void *const *descs, const int32_t *kinds, const int32_t *indices) {
  Step step;
  step.onednn = true;
  step.primitive = primitive;
  for (int32_t i = 0; i < count; ++i) {
    step.args.push_back(args[i]);
    step.descs.push_back(descs[i]);
    step.refs.push_back(Ref{kinds[i], indices[i]});
  }
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans[plan].steps.push_back(std::move(step));
}

void fj_plan_function(int64_t plan, void *function, int32_t source_kind, int32_t source,
                      int32_t destination_kind, int32_t destination, long a, long b, long c,
                      long d) {
  Step step;
  step.function = reinterpret_cast<Function>(function);
  step.refs = {Ref{source_kind, source}, Ref{destination_kind, destination}};
  step.sizes[0] = a, step.sizes[1] = b, step.sizes[2] = c, step.sizes[3] = d;
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans[plan].steps.push_back(std::move(step));
}

}  // extern "C"

struct FreeDeleter {
  void operator()(void *p) const { std::free(p); }
};

// The address `ref` names, or null (and `error` said) where the call has no such buffer.
static void *Address(const std::vector<void *> *buffers, Ref ref, std::string *error) {
  static const char *names[] = {"argument", "result", "scratch buffer"};
  if (ref.kind < kArgument || ref.kind > kScratch || ref.index < 0 ||
      static_cast<size_t>(ref.index) >= buffers[ref.kind].size()) {
    *error = "a step names " + std::string(ref.kind >= 0 && ref.kind <= 2 ? names[ref.kind]
                                                                             : "buffer") +
             " " + std::to_string(ref.index) + ", which this call does not have";
    return nullptr;
  }
  return buffers[ref.kind][ref.index];
}

static std::string RunOneDnn(const Step &step, const std::vector<void *> *buffers) {
  if (dnnl.primitive_execute == nullptr) return "oneDNN is not loaded";
  std::vector<dnnl_exec_arg_t> args;
  std::string error;
  for (size_t i = 0; i < step.args.size() && error.empty(); ++i) {
    void *memory = nullptr;
    void *address = Address(buffers, step.refs[i], &error);
    if (!error.empty()) break;
    if (int status = dnnl.memory_create(&memory, step.descs[i], dnnl.engine, address))
      error = "oneDNN memory create failed with status " + std::to_string(status);
    else
      args.push_back(dnnl_exec_arg_t{step.args[i], memory});
  }
  if (error.empty()) {
    if (int status = dnnl.primitive_execute(step.primitive, dnnl.stream,
                                            static_cast<int>(args.size()), args.data()))
      error = "oneDNN execute failed with status " + std::to_string(status);
    else if (int status = dnnl.stream_wait(dnnl.stream))
      error = "oneDNN stream wait failed with status " + std::to_string(status);
  }
  for (const auto &arg : args) dnnl.memory_destroy(arg.memory);
  return error;
}

static std::string RunPlan(const Plan &plan, std::vector<void *> *buffers) {
  std::vector<std::unique_ptr<void, FreeDeleter>> scratch;
  for (size_t bytes : plan.scratch) {
    size_t size = (bytes + 63) / 64 * 64 + 64;
    scratch.emplace_back(std::aligned_alloc(64, size));
    if (!scratch.back()) return "could not allocate " + std::to_string(bytes) + " bytes";
    // Zeroed: a blocked kernel layout pads its channels, and oneDNN's kernels may read the
    // padding as zeros; memory reused from the heap would put old values there.
    std::memset(scratch.back().get(), 0, size);
    buffers[kScratch].push_back(scratch.back().get());
  }
  for (const Step &step : plan.steps) {
    if (step.onednn) {
      std::string error = RunOneDnn(step, buffers);
      if (!error.empty()) return error;
    } else if (step.function != nullptr) {
      std::string error;
      void *from = Address(buffers, step.refs[0], &error);
      void *to = error.empty() ? Address(buffers, step.refs[1], &error) : nullptr;
      if (!error.empty()) return error;
      if (step.function(from, to, step.sizes[0], step.sizes[1], step.sizes[2], step.sizes[3]))
        return "a C kernel could not allocate its working memory";
    } else {
      return "a function step without a function";
    }
  }
  return "";
}

static ffi::Error Run(int64_t number, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<void *> buffers[3];
  for (size_t i = 0; i < args.size(); ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    buffers[kArgument].push_back(buffer->untyped_data());
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buffer = rets.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    buffers[kResult].push_back((*buffer)->untyped_data());
  }
  const Plan *plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    if (number < 0 || number >= static_cast<int64_t>(plans.size()))
      return ffi::Error::InvalidArgument("native kernel: no plan number " +
                                         std::to_string(number));
    plan = &plans[number];
  }
  std::lock_guard<std::mutex> lock(run_mutex);
  std::string error = RunPlan(*plan, buffers);
  if (!error.empty()) return ffi::Error::Internal("native kernel: " + error);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(fracture_jax_native, Run,
                              ffi::Ffi::Bind().Attr<int64_t>("plan").RemainingArgs().RemainingRets());
