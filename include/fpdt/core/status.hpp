//! \file
//! \brief `status` and `result<T>`: errors carried as values, with messages that name the values.
//!
//! Public host APIs of fpdt return a `[[nodiscard]]` status (or a `result<T>` holding a value or a
//! status) instead of throwing. A failing status carries a code for programs and a message for
//! people; the message names the offending values and the rule they broke, for example
//! "sequence length 7 is not divisible by world size 2".
#pragma once

#include "../config.hpp"

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

FPDT_NAMESPACE_BEGIN

//! Error categories. `ok` is the only success value.
enum class errc : std::uint8_t {
  ok = 0,           //!< success
  invalid_argument, //!< a value breaks a documented rule (divisibility, range, null pointer)
  shape_mismatch,   //!< tensor extents or strides do not match what the API requires
  out_of_memory,    //!< an allocation would exceed a budget or the allocator failed
  backend_error,    //!< a stream, event, copy or kernel failed (CUDA error, task exception)
  comm_error,       //!< a communicator operation failed or a peer rank reported an error
  timeout,          //!< a bounded wait expired (a peer rank did not answer in time)
  not_supported,    //!< the combination is valid but not implemented by this backend or kernel
  internal,         //!< a broken invariant inside fpdt: please report it
};

//! Name of an error code, e.g. "out_of_memory".
[[nodiscard]] constexpr std::string_view to_string(errc code) noexcept {
  switch (code) {
  case errc::ok: return "ok";
  case errc::invalid_argument: return "invalid_argument";
  case errc::shape_mismatch: return "shape_mismatch";
  case errc::out_of_memory: return "out_of_memory";
  case errc::backend_error: return "backend_error";
  case errc::comm_error: return "comm_error";
  case errc::timeout: return "timeout";
  case errc::not_supported: return "not_supported";
  case errc::internal: return "internal";
  }
  return "unknown";
}

namespace detail {
//! Streams every argument into one string ("sequence length ", 7, " is ...").
template <class... Args> [[nodiscard]] std::string concat(Args const&... args) {
  std::ostringstream os;
  ((os << args), ...);
  return os.str();
}
} // namespace detail

//! Outcome of an operation: `errc::ok`, or an error code with a message naming the values.
//!
//! Cheap when ok (an empty string). Test with `ok()` or `if (!s)`; never ignore (`[[nodiscard]]`).
class FPDT_NODISCARD_TYPE status {
public:
  //! A success status.
  status() noexcept = default;
  //! A status with `code` and a human-readable `message`; `code == errc::ok` ignores the message.
  status(errc code, std::string message) : code_(code) {
    if (code != errc::ok) message_ = std::move(message);
  }

  //! True when the operation succeeded.
  [[nodiscard]] bool ok() const noexcept { return code_ == errc::ok; }
  //! Same as ok().
  explicit operator bool() const noexcept { return ok(); }
  //! The error code (`errc::ok` on success).
  [[nodiscard]] errc code() const noexcept { return code_; }
  //! The message, empty on success.
  [[nodiscard]] std::string const& message() const noexcept { return message_; }
  //! "code: message" for logs, or "ok".
  [[nodiscard]] std::string to_string() const {
    if (ok()) return "ok";
    return detail::concat(fpdt::to_string(code_), ": ", message_);
  }
  //! Returns a copy whose message is prefixed with `context` ("layer 3: ..."); ok stays ok.
  [[nodiscard]] status with_context(std::string_view context) const {
    if (ok()) return {};
    return {code_, detail::concat(context, ": ", message_)};
  }

private:
  errc code_ = errc::ok;
  std::string message_;
};

//! A success status (reads better than `status{}` at a return).
[[nodiscard]] inline status ok_status() noexcept { return {}; }

//! Builds a failing status whose message is the concatenation of `args` (streamed with <<).
template <class... Args> [[nodiscard]] status make_error(errc code, Args const&... args) {
  return {code, detail::concat(args...)};
}

//! Thrown by `result<T>::value()` on a result that holds an error: a programming error (check
//! `ok()` first); what() is the status's "code: message".
class bad_result_access : public std::logic_error {
public:
  //! An exception carrying `error`.
  explicit bad_result_access(status error)
      : std::logic_error("fpdt::result::value() on an error: " + error.to_string()),
        error_(std::move(error)) {}
  //! The status the result held.
  [[nodiscard]] status const& error() const noexcept { return error_; }

private:
  status error_;
};

//! A value of type `T`, or the status that explains why there is none.
//!
//! `T` may not be `status`. Access the value only after checking `ok()`; `value()` asserts it.
template <class T> class FPDT_NODISCARD_TYPE result {
  static_assert(!std::is_same_v<std::remove_cv_t<T>, status>, "result<status> is meaningless");
  static_assert(!std::is_reference_v<T>, "result<T&> is not supported; use result<T*>");

public:
  //! A successful result holding `value`.
  result(T value) : state_(std::in_place_index<0>, std::move(value)) {}
  //! A failed result; `error` must not be ok (an ok status becomes errc::internal).
  result(status error) : state_(std::in_place_index<1>, std::move(error)) {
    if (std::get<1>(state_).ok())
      state_.template emplace<1>(errc::internal, "result<T> built from an ok status without a value");
  }

  //! True when a value is held.
  [[nodiscard]] bool ok() const noexcept { return state_.index() == 0; }
  //! Same as ok().
  explicit operator bool() const noexcept { return ok(); }

  //! The held value. Throws `bad_result_access` (with the error's message) when there is none.
  [[nodiscard]] T& value() & {
    check();
    return std::get<0>(state_);
  }
  //! The held value. Throws `bad_result_access` when there is none.
  [[nodiscard]] T const& value() const& {
    check();
    return std::get<0>(state_);
  }
  //! Moves the held value out. Throws `bad_result_access` when there is none.
  [[nodiscard]] T&& value() && {
    check();
    return std::get<0>(std::move(state_));
  }
  //! The held value; requires ok().
  [[nodiscard]] T* operator->() { return &value(); }
  //! The held value; requires ok().
  [[nodiscard]] T const* operator->() const { return &value(); }
  //! The held value; requires ok().
  [[nodiscard]] T& operator*() & { return value(); }
  //! The held value; requires ok().
  [[nodiscard]] T const& operator*() const& { return value(); }
  //! Moves the held value out; requires ok().
  [[nodiscard]] T&& operator*() && { return std::move(*this).value(); }

  //! The status: ok when a value is held, else the error.
  [[nodiscard]] status error() const {
    if (ok()) return {};
    return std::get<1>(state_);
  }

private:
  void check() const {
    if (!ok()) throw bad_result_access(std::get<1>(state_));
  }
  std::variant<T, status> state_;
};

namespace detail {
[[nodiscard]] inline status to_status(status s) { return s; }
template <class T> [[nodiscard]] status to_status(result<T> const& r) { return r.error(); }
} // namespace detail

FPDT_NAMESPACE_END

//! Evaluates `expr` (a status or result) and returns its status from the enclosing function when
//! it failed. The enclosing function must return `fpdt::status` or a `fpdt::result<U>`.
#define FPDT_TRY(expr)                                                                             \
  do {                                                                                             \
    if (auto&& fpdt_try_value_ = (expr); !fpdt_try_value_.ok())                                   \
      return ::fpdt::detail::to_status(fpdt_try_value_);                                           \
  } while (0)
