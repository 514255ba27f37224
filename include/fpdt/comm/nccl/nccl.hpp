//! \file
//! \brief Aggregator of fpdt/comm/nccl: the NCCL communicator and the NCCL error check (needs
//! NCCL and the CUDA runtime: link `fpdt::nccl`).
#pragma once

#include "nccl_check.hpp"
#include "nccl_communicator.hpp"
