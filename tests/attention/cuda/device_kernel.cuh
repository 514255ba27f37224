// Test adapter: runs a CUDA chunk kernel on host tensors, so the host tests' chunked driver
// (chunked_driver.hpp) drives device kernels unchanged. Each call copies the operands into fresh
// contiguous device buffers, poisons every output buffer with NaN (so an unwritten element shows),
// runs the kernel, waits, and copies the results back through the caller's (strided) views.
#pragma once

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/backend/cuda/cuda_check.hpp>
#include <fpdt/core/status.hpp>
#include <fpdt/core/tensor_view.hpp>

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <utility>
#include <vector>

namespace fpdt_test {

// A device buffer of n elements of T, freed on destruction.
template <class T> struct device_buffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_buffer(std::size_t count) : n(count) {
    if (n > 0 && cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T)) != cudaSuccess)
      ptr = nullptr;
  }
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  ~device_buffer() { cudaFree(ptr); }
  void poison() const { cudaMemset(ptr, 0xff, n * sizeof(T)); } // all-ones bits: NaN for floats
};

// Contiguous device copy of a (possibly strided) host view, and its contiguous device view.
template <class T, std::size_t R> struct device_copy {
  using value = std::remove_const_t<T>;
  device_buffer<value> buf;
  fpdt::tensor_view<value, R> dview{};
  explicit device_copy(fpdt::tensor_view<T, R> const& h) : buf(static_cast<std::size_t>(h.size())) {
    std::vector<value> host(static_cast<std::size_t>(h.size()));
    std::size_t at = 0;
    for_each_index(h, [&](auto... i) { host[at++] = h(i...); });
    if (!host.empty())
      cudaMemcpy(buf.ptr, host.data(), host.size() * sizeof(value), cudaMemcpyHostToDevice);
    std::array<fpdt::index_t, R> ext{};
    for (std::size_t d = 0; d < R; ++d)
      ext[d] = h.extent(d);
    dview = fpdt::contiguous_view(buf.ptr, ext).value(); // null only when empty
  }
  // Copies the device contents back into the host view h (same extents).
  template <class U> void download(fpdt::tensor_view<U, R> const& h) const {
    std::vector<value> host(buf.n);
    if (!host.empty())
      cudaMemcpy(host.data(), buf.ptr, host.size() * sizeof(value), cudaMemcpyDeviceToHost);
    std::size_t at = 0;
    for_each_index(h, [&](auto... i) { h(i...) = host[at++]; });
  }
  template <class V, class F> static void for_each_index(V const& v, F&& f) {
    if constexpr (R == 2) {
      for (fpdt::index_t a = 0; a < v.extent(0); ++a)
        for (fpdt::index_t b = 0; b < v.extent(1); ++b)
          f(a, b);
    } else {
      for (fpdt::index_t a = 0; a < v.extent(0); ++a)
        for (fpdt::index_t b = 0; b < v.extent(1); ++b)
          for (fpdt::index_t c = 0; c < v.extent(2); ++c)
            f(a, b, c);
    }
  }
};

// Device memory for the shared case bodies (padded_buffers_case.hpp): a host vector mirrored
// byte for byte in a device buffer, padding included; inputs as device copies.
struct device_memory {
  template <class U> struct buffer {
    std::vector<U> host;
    device_buffer<U> dev;
    explicit buffer(std::vector<U> h) : host(std::move(h)), dev(host.size()) {}
    U* ptr() const { return dev.ptr; }
    void upload() const { cudaMemcpy(dev.ptr, host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice); }
    void download() { cudaMemcpy(host.data(), dev.ptr, host.size() * sizeof(U), cudaMemcpyDeviceToHost); }
  };
  template <class U, std::size_t R> using input = device_copy<U, R>;
  static fpdt::status sync() {
    FPDT_CUDA_CHECK(cudaDeviceSynchronize());
    return {};
  }
};

// Models fpdt::chunk_kernel on host tensors by running Kernel on device copies.
template <class Kernel> struct on_device {
  Kernel kernel{};

  template <class T> fpdt::status forward(fpdt::chunk_forward_args<T> const& a) const {
    device_copy q(a.q), k(a.k), v(a.v);
    device_copy out(fpdt::tensor_view<float const, 3>(a.out.out));
    device_copy lse(fpdt::tensor_view<float const, 2>(a.out.lse));
    out.buf.poison();
    lse.buf.poison();
    fpdt::chunk_forward_args<T> d = a;
    d.q = q.dview;
    d.k = k.dview;
    d.v = v.dview;
    d.out = {out.dview, lse.dview};
    FPDT_TRY(kernel.forward(d));
    FPDT_CUDA_CHECK(cudaDeviceSynchronize());
    out.download(a.out.out);
    lse.download(a.out.lse);
    return {};
  }

  template <class T> fpdt::status backward(fpdt::chunk_backward_args<T> const& a) const {
    device_copy q(a.q), k(a.k), v(a.v), dout(a.dout);
    device_copy lse(a.lse), delta(a.delta);
    device_copy dq(fpdt::tensor_view<float const, 3>(a.dq));
    device_copy dk(fpdt::tensor_view<float const, 3>(a.dk));
    device_copy dv(fpdt::tensor_view<float const, 3>(a.dv));
    fpdt::chunk_backward_args<T> d = a;
    d.q = q.dview;
    d.k = k.dview;
    d.v = v.dview;
    d.out = {};
    d.dout = dout.dview;
    d.lse = lse.dview;
    d.delta = delta.dview;
    d.dq = dq.dview;
    d.dk = dk.dview;
    d.dv = dv.dview;
    FPDT_TRY(kernel.backward(d));
    FPDT_CUDA_CHECK(cudaDeviceSynchronize());
    dq.download(a.dq);
    dk.download(a.dk);
    dv.download(a.dv);
    return {};
  }
};

} // namespace fpdt_test
