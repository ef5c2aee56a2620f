// Value checks that fail the running program, without a host callback (see
// mcq_jax/_runtime_checks.py).
//
//   mcq_raise_if: flags (..., n) bool; attribute `messages`, n messages
//                 joined by '\x1e' -> fails the call with the message of the
//                 first set flag (of the last axis; leading axes come from
//                 vmap: the first entry with a set flag); its other operands (the
//                 model's outputs) pass through, aliased to its results, so
//                 that the check runs wherever they are used.
//
// A program with an effect (a host callback, even one it never calls, or a
// custom call marked as having side effects) is dispatched by JAX's slower
// path: ~45-90 us more per call on this CPU (jax 0.10), more than a small
// model's whole call. An FFI error instead fails the program as a callback's
// exception would; the Python side turns its message back into the
// documented exception type.

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The i-th of the messages joined by '\x1e'.
std::string_view Nth(std::string_view messages, int64_t i) {
  size_t start = 0;
  for (int64_t j = 0; j < i; ++j) {
    const size_t next = messages.find('\x1e', start);
    if (next == std::string_view::npos) return {};
    start = next + 1;
  }
  return messages.substr(start, messages.find('\x1e', start) - start);
}

ffi::Error RaiseIfImpl(std::string_view messages,
                       ffi::Buffer<ffi::PRED> flags, ffi::RemainingArgs inputs,
                       ffi::RemainingRets outputs) {
  if (inputs.size() != outputs.size()) {
    return ffi::Error::InvalidArgument("raise_if: one result per input");
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto in = inputs.get<ffi::AnyBuffer>(i);
    auto out = outputs.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) {
      return ffi::Error::InvalidArgument("raise_if: unreadable operand");
    }
    if ((*out)->size_bytes() != in->size_bytes()) {
      return ffi::Error::InvalidArgument("raise_if: result size differs");
    }
    // aliased by the caller; XLA may still give a result a buffer of its own
    if ((*out)->untyped_data() != in->untyped_data()) {
      std::memcpy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
    }
  }
  const auto dims = flags.dimensions();
  const int64_t n = dims.size() == 0 ? 1 : dims.back();
  const int64_t count = static_cast<int64_t>(flags.element_count());
  const bool* set = flags.typed_data();
  if (n == 0) return ffi::Error::Success();
  // The first set flag of the first batch entry that has one (a host
  // callback under vmap checks the entries one by one, in this order).
  int64_t first = -1;
  for (int64_t i = 0; i < count && first < 0; ++i) {
    if (set[i]) first = i % n;
  }
  if (first < 0) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kUnknown,
                    std::string(Nth(messages, first)));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(McqRaiseIf, RaiseIfImpl,
                              ffi::Ffi::Bind()
                                  .Attr<std::string_view>("messages")
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .RemainingArgs()
                                  .RemainingRets());
