//! \file
//! \brief Library configuration: version, ABI namespace and the prefixed portability macros.
//!
//! Every fpdt header includes this one first. All macros are prefixed `FPDT_`; none leak common
//! names. Two embedders compiled with different options can keep their symbols apart by defining
//! `FPDT_ABI_NAMESPACE` before the first include (the CUB habit of a wrappable inline namespace).
#pragma once

//! Major version of fpdt (incremented on incompatible API changes).
#define FPDT_VERSION_MAJOR 0
//! Minor version of fpdt (incremented on compatible additions).
#define FPDT_VERSION_MINOR 1
//! Patch version of fpdt (incremented on fixes).
#define FPDT_VERSION_PATCH 0
//! The version as one integer, `major * 10000 + minor * 100 + patch`, for `#if` tests.
#define FPDT_VERSION (FPDT_VERSION_MAJOR * 10000 + FPDT_VERSION_MINOR * 100 + FPDT_VERSION_PATCH)
//! The version as a string literal, "major.minor.patch".
#define FPDT_VERSION_STRING "0.1.0"

#ifndef FPDT_ABI_NAMESPACE
//! Name of the inline namespace that holds every fpdt symbol; define it before including fpdt to
//! keep two differently configured copies of the library apart in one program.
#define FPDT_ABI_NAMESPACE v0_1_0
#endif

//! Opens the fpdt namespace (with its inline ABI namespace); pair with FPDT_NAMESPACE_END.
#define FPDT_NAMESPACE_BEGIN                                                                       \
  namespace fpdt {                                                                                 \
  inline namespace FPDT_ABI_NAMESPACE {
//! Closes what FPDT_NAMESPACE_BEGIN opened.
#define FPDT_NAMESPACE_END                                                                         \
  }                                                                                                \
  }

#if defined(__CUDACC__) || defined(__HIPCC__)
//! Marks a function callable from host and device code when compiled by nvcc; empty otherwise.
#define FPDT_HOST_DEVICE __host__ __device__
//! Marks a device-only function under nvcc; empty otherwise.
#define FPDT_DEVICE __device__
#else
//! Marks a function callable from host and device code when compiled by nvcc; empty otherwise.
#define FPDT_HOST_DEVICE
//! Marks a device-only function under nvcc; empty otherwise.
#define FPDT_DEVICE
#endif

#if defined(_MSC_VER)
//! Asks the compiler to inline a small hot function.
#define FPDT_FORCEINLINE __forceinline
#else
//! Asks the compiler to inline a small hot function.
#define FPDT_FORCEINLINE inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__) && !defined(__clang__)
// nvcc's front end warns (#2810-D) on every assignment to a [[nodiscard]] class, since operator=
// returns the class; under nvcc the functions that return one carry [[nodiscard]] themselves.
#define FPDT_NODISCARD_TYPE
#else
//! `[[nodiscard]]` on a class (so every function returning it must be used); empty under nvcc.
#define FPDT_NODISCARD_TYPE [[nodiscard]]
#endif

//! `__builtin_bit_cast(T, x)`: constexpr and usable in device code (std::bit_cast is not marked
//! `__device__`, so nvcc would refuse it in kernels without --expt-relaxed-constexpr).
#define FPDT_BIT_CAST(T, x) __builtin_bit_cast(T, x)

//! Expands to its argument as a string literal, after macro expansion.
#define FPDT_STRINGIFY(x) FPDT_STRINGIFY_IMPL(x)
//! Helper of FPDT_STRINGIFY; do not use directly.
#define FPDT_STRINGIFY_IMPL(x) #x

FPDT_NAMESPACE_BEGIN

//! Version of the headers in use, as a struct for run-time reporting.
struct version_info {
  int major; //!< FPDT_VERSION_MAJOR
  int minor; //!< FPDT_VERSION_MINOR
  int patch; //!< FPDT_VERSION_PATCH
};

//! The version of the included fpdt headers.
inline constexpr version_info version{FPDT_VERSION_MAJOR, FPDT_VERSION_MINOR, FPDT_VERSION_PATCH};

FPDT_NAMESPACE_END
