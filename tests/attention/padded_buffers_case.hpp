// CASES.md A10 for any chunk kernel, one body for the host and the GPU tests: lse [H, Sq] inside
// a NaN-filled buffer with row stride Sq + 3 and 5 trailing elements (or transposed over
// [Sq, H]), out [Sq, H, D] with 8 NaN elements after each D row, and the backward given the
// padded lse and a padded delta and writing a padded dq. The padding must stay NaN, no NaN may
// reach the tensors, and the values must match float64.
//
// `Mem` says where the kernel's buffers live:
// - `Mem::buffer<U>(std::vector<U> host)`: a buffer mirrored in `host`, with `ptr()` (the
//   kernel's address), `upload()` (host to kernel memory) and `download()` (back);
// - `Mem::input<U, R>(host view)`: a copy of an input with its view `dview` in kernel memory;
// - `Mem::sync()`: waits for the kernel's work.
// host_memory (below) is the identity; the GPU tests use device memory (cuda/device_kernel.cuh).
#pragma once

#include "chunked_driver.hpp"
#include "reference.hpp"

#include <fpdt/attention/chunk_kernel.hpp>
#include <fpdt/attention/online_softmax.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <utility>
#include <vector>

namespace fpdt_test {

// The kernel works on the host vectors themselves.
struct host_memory {
  template <class U> struct buffer {
    std::vector<U> host;
    explicit buffer(std::vector<U> h) : host(std::move(h)) {}
    U* ptr() { return host.data(); }
    void upload() const {}
    void download() const {}
  };
  template <class U, std::size_t R> struct input {
    fpdt::tensor_view<U, R> dview;
    explicit input(fpdt::tensor_view<U, R> const& h) : dview(h) {}
  };
  static fpdt::status sync() { return {}; }
};

template <class T, class Mem, class Kernel> void padded_buffers_case(Kernel const& kernel, double tol) {
  using fpdt::index_t;
  using namespace chunked;
  using buf = typename Mem::template buffer<float>;
  constexpr index_t sq = 16, h = 2, d = 128, lse_ld = sq + 3, out_ld = d + 8;
  attn_shape const s{sq, sq, h, h, d};
  auto p = random_problem<T>(s, 101);
  for (bool causal : {false, true})
    for (bool transposed_lse : {false, true}) {
      CAPTURE(causal);
      CAPTURE(transposed_lse);
      run_options o;
      o.mask = causal ? fpdt::causal_mask : fpdt::full_mask;
      std::size_t const lse_n = static_cast<std::size_t>(h * lse_ld + 5),
                        out_n = static_cast<std::size_t>(sq * h * out_ld);
      buf lse(std::vector<float>(lse_n, fnan)), delta(std::vector<float>(lse_n, fnan)),
          out(std::vector<float>(out_n, fnan)), dq(std::vector<float>(out_n, fnan)),
          dk(std::vector<float>(s.kv_size(), 0.0f)), dv(std::vector<float>(s.kv_size(), 0.0f));
      std::array<index_t, 2> const lse_st =
          transposed_lse ? std::array<index_t, 2>{1, h} : std::array<index_t, 2>{lse_ld, 1};
      std::array<index_t, 3> const out_st{h * out_ld, out_ld, 1};
      auto padded = [](buf& b, float* base, auto ext, auto strides) {
        return fpdt::make_tensor_view(base, ext, strides, static_cast<index_t>(b.host.size())).value();
      };
      auto const out_h = padded(out, out.host.data(), s.q_ext(), out_st);
      auto const dq_h = padded(dq, dq.host.data(), s.q_ext(), out_st);
      auto const lse_h = padded(lse, lse.host.data(), s.lse_ext(), lse_st);
      auto const delta_h = padded(delta, delta.host.data(), s.lse_ext(), lse_st);
      for (index_t i = 0; i < sq; ++i) // dq accumulates: zero its elements, not the padding
        for (index_t hh = 0; hh < h; ++hh)
          for (index_t x = 0; x < d; ++x)
            dq_h(i, hh, x) = 0.0f;
      for (buf* b : {&out, &lse, &dk, &dv})
        b->upload();
      typename Mem::template input<T const, 3> qd(cview(p.q, s.q_ext())), kd(cview(p.k, s.kv_ext())),
          vd(cview(p.v, s.kv_ext())), dod(cview(p.dout, s.q_ext()));
      fpdt::chunk_forward_args<T> a{};
      a.q = qd.dview;
      a.k = kd.dview;
      a.v = vd.dview;
      a.out = {padded(out, out.ptr(), s.q_ext(), out_st), padded(lse, lse.ptr(), s.lse_ext(), lse_st)};
      a.mask = o.mask;
      REQUIRE(kernel.forward(a).ok());
      REQUIRE(Mem::sync().ok());
      out.download();
      lse.download();
      // delta = rowsum(dout * out) on the host, through the padded views.
      REQUIRE(fpdt::compute_delta(fpdt::tensor_view<float const, 3>(out_h), cview(p.dout, s.q_ext()), delta_h).ok());
      delta.upload();
      dq.upload();
      fpdt::chunk_backward_args<T> b{};
      b.q = a.q;
      b.k = a.k;
      b.v = a.v;
      b.dout = dod.dview;
      b.lse = padded(lse, lse.ptr(), s.lse_ext(), lse_st);
      b.delta = padded(delta, delta.ptr(), s.lse_ext(), lse_st);
      b.dq = padded(dq, dq.ptr(), s.q_ext(), out_st);
      b.dk = fpdt::contiguous_view(dk.ptr(), s.kv_ext()).value();
      b.dv = fpdt::contiguous_view(dv.ptr(), s.kv_ext()).value();
      b.mask = o.mask;
      REQUIRE(kernel.backward(b).ok());
      REQUIRE(Mem::sync().ok());
      for (buf* x : {&dq, &dk, &dv, &lse}) // lse too: the backward must not write lse or delta
        x->download();
      run_result r;
      r.out.resize(s.q_size());
      r.dq.resize(s.q_size());
      r.lse.resize(s.lse_size());
      r.dk.assign(dk.host.begin(), dk.host.end());
      r.dv.assign(dv.host.begin(), dv.host.end());
      // Gather the viewed elements; mark them so the rest must be NaN padding.
      std::vector<char> out_used(out_n, 0), lse_used(lse_n, 0);
      for (index_t i = 0; i < sq; ++i)
        for (index_t hh = 0; hh < h; ++hh) {
          lse_used[static_cast<std::size_t>(&lse_h(hh, i) - lse.host.data())] = 1;
          r.lse[static_cast<std::size_t>(hh * sq + i)] = lse_h(hh, i);
          CHECK_FALSE(std::isnan(delta_h(hh, i)));
          for (index_t x = 0; x < d; ++x) {
            out_used[static_cast<std::size_t>(&out_h(i, hh, x) - out.host.data())] = 1;
            r.out[static_cast<std::size_t>((i * h + hh) * d + x)] = out_h(i, hh, x);
            r.dq[static_cast<std::size_t>((i * h + hh) * d + x)] = dq_h(i, hh, x);
          }
        }
      std::size_t pad_ok = 0, pad_total = 0;
      for (std::size_t at = 0; at < lse_n; ++at)
        if (!lse_used[at]) {
          ++pad_total;
          pad_ok += std::isnan(lse.host[at]) && std::isnan(delta.host[at]);
        }
      for (std::size_t at = 0; at < out_n; ++at)
        if (!out_used[at]) {
          ++pad_total;
          pad_ok += std::isnan(out.host[at]) && std::isnan(dq.host[at]);
        }
      CHECK(pad_total > 0);
      CHECK(pad_ok == pad_total);
      check_against_reference(r, reference_of(p, o), p, tol);
    }
}

} // namespace fpdt_test
