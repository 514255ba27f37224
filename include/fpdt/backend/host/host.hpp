//! \file
//! \brief Aggregator of fpdt/backend/host: the host backend, its streams, events and memory.
#pragma once

#include "event.hpp"
#include "host_backend.hpp"
#include "host_memory.hpp"
#include "stream.hpp"
