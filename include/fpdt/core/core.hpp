//! \file
//! \brief Aggregator of fpdt/core: dtypes, status and result, tensor views, parallel_for.
#pragma once

#include "bfloat16.hpp"
#include "dtype.hpp"
#include "half.hpp"
#include "parallel_for.hpp"
#include "status.hpp"
#include "tensor_view.hpp"
