//! \file
//! \brief Umbrella header for CUDA translation units: every host-safe header plus the CUDA ones.
//!
//! Include from `.cu` files compiled by nvcc (link `fpdt::cuda`).
#pragma once

#include "fpdt.hpp"
#include "backend/cuda/cuda.hpp"
#include "attention/cuda/reference_attention.cuh"
#include "attention/cuda/flash_attention.cuh"
#include "attention/cuda/external_kernel.cuh"
#include "layers/cuda/attention_step_ops.cuh"
