//! \file
//! \brief Aggregator of fpdt/core: dtypes, status and result, tensor views.
#pragma once

#include "bfloat16.hpp"
#include "dtype.hpp"
#include "half.hpp"
#include "status.hpp"
#include "tensor_view.hpp"
