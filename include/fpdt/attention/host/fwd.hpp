//! \file
//! \brief Declaration of `host_chunk_kernel`, without its definition.
//!
//! What a header needs to name the host chunk kernel (e.g. as a default template argument)
//! without the kernel itself. Using it needs the definition: `chunk_attention.hpp` (or
//! `layers/host_defaults.hpp`, `fpdt.hpp`).
#pragma once

#include "../../config.hpp"

FPDT_NAMESPACE_BEGIN

struct host_chunk_kernel;

FPDT_NAMESPACE_END
