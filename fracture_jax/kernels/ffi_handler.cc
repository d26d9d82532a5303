// The XLA FFI handler of fracture_jax's native kernels (fracture_jax/kernels/ffi.py).
//
// Written against the FFI headers that jaxlib ships (jax.ffi.include_dir()): the handler's
// binding, the call frame's layout and the API version it reports come from those headers, so
// a jaxlib whose FFI changed incompatibly refuses the handler at registration. The handler
// reads the plan number attribute and the buffers' addresses, then hands them to the plan
// runner that ffi.py installs (fj_set_runner); a plan's failure becomes an XLA error.
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Runs plan `plan` on the argument and result addresses; nonzero on failure, with a message.
using PlanRunner = int (*)(int64_t plan, void **args, int64_t num_args, void **rets,
                           int64_t num_rets, char *message, int64_t message_size);

static PlanRunner runner = nullptr;

extern "C" void fj_set_runner(PlanRunner fn) { runner = fn; }

static ffi::Error Run(int64_t plan, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<void *> in, out;
  for (size_t i = 0; i < args.size(); ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    in.push_back(buffer->untyped_data());
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buffer = rets.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    out.push_back((*buffer)->untyped_data());
  }
  if (runner == nullptr) return ffi::Error::Internal("native kernel: no plan runner installed");
  char message[2048] = {0};
  if (runner(plan, in.data(), static_cast<int64_t>(in.size()), out.data(),
             static_cast<int64_t>(out.size()), message, sizeof message) != 0)
    return ffi::Error::Internal(std::string("native kernel: ") + message);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(fracture_jax_native, Run,
                              ffi::Ffi::Bind().Attr<int64_t>("plan").RemainingArgs().RemainingRets());
