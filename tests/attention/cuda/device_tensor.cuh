// Test helper for the GPU layer tests: a device tensor uploaded from (or poisoned with NaN for)
// a host vector, its views, and the download of its contents as another element type. Failures
// of the CUDA calls fail the test (REQUIRE).
#pragma once

#include "device_kernel.cuh"

#include <doctest/doctest.h>

#include <array>
#include <cstddef>
#include <vector>

namespace fpdt_test {

template <class T> struct device_tensor {
  device_buffer<T> buf;
  explicit device_tensor(std::vector<T> const& host) : buf(host.size()) {
    REQUIRE(buf.ptr != nullptr);
    REQUIRE(cudaMemcpy(buf.ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  // n elements, every bit set (NaN for floats: an element the code under test never wrote shows).
  explicit device_tensor(std::size_t n) : buf(n) {
    REQUIRE(buf.ptr != nullptr);
    buf.poison();
  }
  template <std::size_t R> fpdt::tensor_view<T, R> view(std::array<fpdt::index_t, R> e) const {
    return fpdt::contiguous_view(buf.ptr, e).value();
  }
  template <std::size_t R> fpdt::tensor_view<T const, R> cview(std::array<fpdt::index_t, R> e) const {
    return fpdt::contiguous_view<T const>(buf.ptr, e).value();
  }
  template <class U> void download(std::vector<U>& host) const {
    std::vector<T> tmp(buf.n);
    REQUIRE(cudaMemcpy(tmp.data(), buf.ptr, buf.n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    host.assign(buf.n, U{});
    for (std::size_t i = 0; i < buf.n; ++i)
      host[i] = static_cast<U>(static_cast<float>(tmp[i]));
  }
};

} // namespace fpdt_test
