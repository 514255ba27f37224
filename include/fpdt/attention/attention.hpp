//! \file
//! \brief Aggregator of fpdt/attention: masks, partial states and their merge, the chunk kernel
//! concept, and the host kernel.
#pragma once

#include "chunk_kernel.hpp"
#include "host/chunk_attention.hpp"
#include "host/dense_reference.hpp"
#include "mask.hpp"
#include "online_softmax.hpp"
