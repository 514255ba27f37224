//! \file
//! \brief Umbrella header: every host-safe fpdt header (compiles with any C++20 compiler).
//!
//! CUDA headers are gathered in `fpdt/fpdt.cuh`; MPI and NCCL headers are included on their own
//! (`fpdt/comm/mpi/...`, `fpdt/comm/nccl/...`) since they need those libraries.
#pragma once

#include "config.hpp"
#include "core/core.hpp"
#include "attention/attention.hpp"
#include "memory/memory.hpp"
#include "backend/backend.hpp"
#include "backend/host/host.hpp"
#include "schedule/token_layout.hpp"
#include "schedule/schedule.hpp"
#include "schedule/ulysses_layout.hpp"
#include "schedule/attention_problem.hpp"
#include "pipeline/trace.hpp"
#include "pipeline/executor.hpp"
#include "layers/fpdt_attention.hpp"
#include "layers/chunked_mlp.hpp"
#include "layers/chunked_cross_entropy.hpp"
#include "layers/host_defaults.hpp"
#include "comm/communicator.hpp"
#include "comm/ulysses.hpp"
#include "layers/sequence_parallel_attention.hpp"
#include "plan/plan.hpp"
