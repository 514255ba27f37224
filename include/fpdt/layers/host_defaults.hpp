//! \file
//! \brief The host types the layers' default template arguments name: `host_backend` (with its
//! `host::stream` and `host::event`) and `host_chunk_kernel`.
//!
//! The layer headers (`fpdt_attention.hpp`, `sequence_parallel_attention.hpp`, `chunked_mlp.hpp`,
//! `chunked_cross_entropy.hpp`) only declare these types, so that code for another backend and
//! kernel does not compile the host ones. Include this header as well to use the defaults, e.g.
//! `fpdt::fpdt_attention<float>` on a `fpdt::host_backend`; `<fpdt/fpdt.hpp>` includes it.
#pragma once

#include "../attention/host/chunk_attention.hpp"
#include "../backend/host/host_backend.hpp"
