//! \file
//! \brief The planner's headers: memory model, cost model, presets and config files, planner.
#pragma once

#include "memory_model.hpp"
#include "cost_model.hpp"
#include "presets.hpp"
#include "planner.hpp"
