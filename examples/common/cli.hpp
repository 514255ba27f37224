// Command-line helpers the examples share: integer options with a range, on/off switches, and
// an output path checked before a long run.
#pragma once

#include <fpdt/core/status.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

namespace fpdt_examples {

using fpdt::index_t;

//! An integer option `--name N` with N in [lo, hi].
struct int_option {
  char const* name;
  index_t* value;
  index_t lo, hi;
};

//! The option of `specs` called `arg`, or null.
inline int_option const* find(std::span<int_option const> specs, std::string const& arg) {
  for (auto const& s : specs)
    if (arg == s.name) return &s;
  return nullptr;
}

//! Sets `*opt.value` from `val`. Errors name the option, the text and the range.
inline fpdt::status set(int_option const& opt, std::string const& val) {
  char* end = nullptr;
  errno = 0;
  long long const v = std::strtoll(val.c_str(), &end, 10);
  if (val.empty() || end == val.c_str() || *end != '\0' || errno == ERANGE)
    return fpdt::make_error(fpdt::errc::invalid_argument, "option ", opt.name, ": '", val, "' is not an integer");
  if (v < opt.lo || v > opt.hi)
    return fpdt::make_error(fpdt::errc::invalid_argument, "option ", opt.name, " ", v, " is outside [", opt.lo, ", ",
                            opt.hi, "]");
  *opt.value = static_cast<index_t>(v);
  return {};
}

//! `on` or `off` for option `name`.
inline fpdt::result<bool> on_off(char const* name, std::string const& val) {
  if (val != "on" && val != "off")
    return fpdt::make_error(fpdt::errc::invalid_argument, name, " takes on or off, not '", val, "'");
  return val == "on";
}

//! Fails now, not after the run, when `path` (given to `name`) cannot be written. An existing
//! file is left as it is (opened for appending), a new one is removed again, so a run that fails
//! later does not leave an empty or truncated file behind.
inline fpdt::status check_writable(char const* name, std::string const& path) {
  if (path.empty()) return {};
  std::FILE* probe = std::fopen(path.c_str(), "r");
  bool const existed = probe != nullptr;
  if (probe != nullptr) std::fclose(probe);
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr)
    return fpdt::make_error(fpdt::errc::invalid_argument, name, " ", path, ": cannot open for writing");
  std::fclose(f);
  if (!existed) std::remove(path.c_str());
  return {};
}

} // namespace fpdt_examples
