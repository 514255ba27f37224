//! \file
//! \brief Aggregator of fpdt/core: dtypes, lanes, status and result, tensor views, parallel_for, host_gemm.
#pragma once

#include "bfloat16.hpp"
#include "dtype.hpp"
#include "gemm.hpp"
#include "half.hpp"
#include "lane.hpp"
#include "parallel_for.hpp"
#include "status.hpp"
#include "tensor_view.hpp"
