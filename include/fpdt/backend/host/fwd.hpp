//! \file
//! \brief Declarations of the host backend's types, without their definitions.
//!
//! What a header needs to name `host_backend` or `host::stream` (e.g. as a default template
//! argument) without the worker threads, events and memory behind them. Using them needs the
//! definitions: `host_backend.hpp` (or `host.hpp`, `layers/host_defaults.hpp`, `fpdt.hpp`).
#pragma once

#include "../../config.hpp"

FPDT_NAMESPACE_BEGIN

class host_backend;

namespace host {
class stream;
class event;
} // namespace host

FPDT_NAMESPACE_END
