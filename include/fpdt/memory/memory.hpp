//! \file
//! \brief Aggregator of fpdt/memory: upstream resources, the device arena, the pinned pool.
#pragma once

#include "device_arena.hpp"
#include "memory_block.hpp"
#include "memory_resource.hpp"
#include "pinned_pool.hpp"
#include "staging_ring.hpp"
#include "chunk_store.hpp"
