//! \file
//! \brief Aggregator of fpdt/backend/cuda: the CUDA backend, its streams, events, memory and
//! error checks (needs the CUDA runtime: link `fpdt::cuda`).
#pragma once

#include "cuda_backend.hpp"
#include "cuda_check.hpp"
#include "cuda_memory.hpp"
#include "event.hpp"
#include "stream.hpp"
