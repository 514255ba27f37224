// Runs a layer on P ranks as threads of one process (fpdt::local_world), each with its own
// backend, in the chunk-interleaved token layout (fpdt::token_layout): scatter a global problem to
// the ranks' local tensors, run, gather the global outputs and gradients. Shared by the
// sequence-parallel layer tests.
#pragma once

#include "../attention/chunked_driver.hpp"

#include <fpdt/backend/host/host_backend.hpp>
#include <fpdt/comm/communicator.hpp>
#include <fpdt/schedule/token_layout.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <thread>
#include <vector>

namespace fpdt_test::ranks {

using fpdt::index_t;
using fpdt_test::attn_shape;
using namespace fpdt_test::chunked;
using namespace std::chrono_literals;

// Local rows of rank r from a global [S, W] buffer and back, through fpdt::token_layout.
inline std::vector<float> scatter(fpdt::token_layout const& tl, std::vector<float> const& g, index_t w, index_t r) {
  std::vector<float> out(static_cast<std::size_t>(tl.local_tokens() * w));
  auto gv = fpdt::contiguous_view<float const>(g.data(), std::array<index_t, 2>{tl.sequence(), w}).value();
  auto lv = fpdt::contiguous_view(out.data(), std::array<index_t, 2>{tl.local_tokens(), w}).value();
  REQUIRE(tl.scatter<float>(gv, r, lv).ok());
  return out;
}
inline void gather(fpdt::token_layout const& tl, std::vector<float> const& l, index_t w, index_t r, std::vector<float>& g) {
  auto lv = fpdt::contiguous_view<float const>(l.data(), std::array<index_t, 2>{tl.local_tokens(), w}).value();
  auto gv = fpdt::contiguous_view(g.data(), std::array<index_t, 2>{tl.sequence(), w}).value();
  REQUIRE(tl.gather<float>(lv, r, gv).ok());
}

struct rank_io {
  std::vector<float> q, k, v, dout, out, dq, dk, dv;
};

// Rank r's local q, k, v, dout of problem p, and NaN-filled outputs.
inline rank_io scatter_io(fpdt::token_layout const& tl, problem<float> const& p, index_t r) {
  attn_shape const& s = p.s;
  rank_io x;
  x.q = scatter(tl, p.q, s.h * s.d, r);
  x.k = scatter(tl, p.k, s.hkv * s.d, r);
  x.v = scatter(tl, p.v, s.hkv * s.d, r);
  x.dout = scatter(tl, p.dout, s.h * s.d, r);
  x.out.assign(x.q.size(), fnan);
  x.dq.assign(x.q.size(), fnan);
  x.dk.assign(x.k.size(), fnan);
  x.dv.assign(x.k.size(), fnan);
  return x;
}

// The global outputs and gradients gathered from every rank's local ones.
inline run_result gather_io(fpdt::token_layout const& tl, attn_shape const& s, std::vector<rank_io> const& io) {
  run_result g;
  g.out.assign(s.q_size(), fnan);
  g.dq.assign(s.q_size(), fnan);
  g.dk.assign(s.kv_size(), fnan);
  g.dv.assign(s.kv_size(), fnan);
  for (std::size_t r = 0; r < io.size(); ++r) {
    gather(tl, io[r].out, s.h * s.d, static_cast<index_t>(r), g.out);
    gather(tl, io[r].dq, s.h * s.d, static_cast<index_t>(r), g.dq);
    gather(tl, io[r].dk, s.hkv * s.d, static_cast<index_t>(r), g.dk);
    gather(tl, io[r].dv, s.hkv * s.d, static_cast<index_t>(r), g.dv);
  }
  return g;
}

// Runs forward and backward of `layers` (one per rank, made by make_layer on its own backend) on P
// threads; returns the gathered global result.
template <class Backend = fpdt::host_backend, class MakeLayer>
run_result run_ranks(problem<float> const& p, index_t ranks, index_t chunk, MakeLayer make_layer,
                     std::vector<fpdt::status>* statuses = nullptr) {
  attn_shape const& s = p.s;
  auto tl = fpdt::token_layout::make(s.sq, ranks, chunk).value();
  std::vector<rank_io> io;
  for (index_t r = 0; r < ranks; ++r)
    io.push_back(scatter_io(tl, p, r));
  fpdt::local_world world(static_cast<int>(ranks), 20s);
  std::vector<fpdt::status> st(static_cast<std::size_t>(ranks));
  std::vector<std::thread> ts;
  for (index_t r = 0; r < ranks; ++r)
    ts.emplace_back([&, r] {
      auto comm = world.communicator(static_cast<int>(r)).value();
      Backend be;
      rank_io& x = io[static_cast<std::size_t>(r)];
      st[static_cast<std::size_t>(r)] = make_layer(be, comm, r, x, tl);
    });
  for (auto& t : ts)
    t.join();
  if (statuses) *statuses = st;
  return gather_io(tl, s, io);
}

template <class Layer> fpdt::status run_one(Layer& layer, rank_io& x, attn_shape const& s, index_t local) {
  std::array<index_t, 3> const qe{local, s.h, s.d}, ke{local, s.hkv, s.d};
  FPDT_TRY(layer.forward(fpdt::contiguous_view<float const>(x.q.data(), qe).value(),
                         fpdt::contiguous_view<float const>(x.k.data(), ke).value(),
                         fpdt::contiguous_view<float const>(x.v.data(), ke).value(),
                         fpdt::contiguous_view(x.out.data(), qe).value()));
  return layer.backward(fpdt::contiguous_view<float const>(x.dout.data(), qe).value(),
                        fpdt::contiguous_view(x.dq.data(), qe).value(),
                        fpdt::contiguous_view(x.dk.data(), ke).value(),
                        fpdt::contiguous_view(x.dv.data(), ke).value());
}

} // namespace fpdt_test::ranks
