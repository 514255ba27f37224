//! \file
//! \brief Umbrella header for CUDA translation units: every host-safe header plus the CUDA ones.
//!
//! Include from `.cu` files compiled by nvcc (link `fpdt::cuda`).
#pragma once

#include "fpdt.hpp"
#include "backend/cuda/cuda_check.hpp"
