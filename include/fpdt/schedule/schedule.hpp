//! \file
//! \brief Chunk schedules: the forward and backward of FPDT attention as plain data, and the
//! checks that prove a schedule safe.
//!
//! docs/design.md 2.2, 2.3 and 4.4 (the schedule's three consumers): a schedule is the ordered list of
//! steps of one pass (produce, offload, fetch, compute(i, j), merge, finalize, delta, zero,
//! write-back, sink, exchange, release) with the lane each runs on and the earlier steps it waits
//! for. On P > 1 ranks the Ulysses all-to-alls are `exchange` steps on the comm lane that write
//! into and read from ring slots directly (docs/design.md 2.4); P = 1 is the same schedule without
//! them. The
//! executor runs it (pipeline/executor.hpp), the layer gives each step its work, the planner
//! prices it, and `check_schedule` proves that every compute step's operands are resident, that no
//! staging slot is reloaded before its last reader is done, that nothing is fetched before it was
//! offloaded, that no slot is read before the exchange that fills it lands or reused while an
//! exchange still reads it, and that no ring is asked for more slots than it has.
//!
//! Device buffers are three rings of slots:
//! - `ring::q`: forward, q_i (1 slot); backward, the query-side bundle of chunk i (q_i, out_i,
//!   lse_i, dout_i, delta_i and the fp32 dq_i accumulator), `ring_slots` slots;
//! - `ring::kv`: k_j and v_j; forward `ring_slots` slots, backward 2 (k_j stays resident for its
//!   inner loop while k_{j+1} is fetched);
//! - `ring::out`: forward, out_i in the model dtype and lse_i, staged for offload and the sink.
//! Without offload every ring has u slots, slot i holding chunk i for the whole pass (the
//! baseline whose memory grows with S). Ordering: a step waits for its listed dependencies and
//! for every earlier step on its own lane (lanes are FIFO streams); `release` steps are markers on
//! no lane that stand for their dependencies.
#pragma once

#include "../attention/mask.hpp"
#include "../config.hpp"
#include "../core/lane.hpp"
#include "../core/status.hpp"
#include "../core/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

FPDT_NAMESPACE_BEGIN

//! The two passes of a layer.
enum class pass : std::uint8_t {
  forward,  //!< docs/design.md 2.2: outer loop over query chunks i, inner over key chunks j
  backward, //!< docs/design.md 2.3: outer loop over key chunks j, inner over query chunks i
};

//! What a step does.
enum class step_kind : std::uint8_t {
  produce,    //!< forward, compute lane: the chunk source writes q_i, k_i, v_i into their slots
  offload,    //!< d2h lane: a device chunk to its pinned host copy
  fetch,      //!< h2d lane: pinned host copies (and the caller's dout_i) into a slot
  compute,    //!< compute lane: the chunk kernel on pair (i, j)
  merge,      //!< forward, compute lane: the partial state of (i, j) into query chunk i's accumulator
  finalize,   //!< forward, compute lane: the accumulator of chunk i to out_i (model dtype) and lse_i
  delta,      //!< backward, compute lane: delta_i = rowsum(dout_i * out_i)
  zero,       //!< backward, compute lane: zero an fp32 accumulator (dq_i at first use, dk_j and dv_j)
  write_back, //!< backward, d2h lane: the dq_i accumulator to its pinned host copy (at i's first
              //!< use also dout_i: payload `dq_dout`)
  sink,       //!< a final chunk to the caller (out_i; dq_i; dk_j and dv_j): on the compute lane
              //!< for P = 1, on the comm lane after the chunk's exchange for P > 1
  release,    //!< marker on no lane: the last readers of a slot's content are done
  exchange,   //!< P > 1, comm lane: a Ulysses all-to-all; `payload` says which (see
              //!< `exchange_fills_slot`): q/k/v and dout sequence-to-head into their slots, out/lse
              //!< and dq out of their slots, dk/dv out of the accumulators, head-to-sequence
};

//! Name of a step kind ("produce", "fetch", ...).
[[nodiscard]] constexpr std::string_view to_string(step_kind k) noexcept {
  constexpr std::string_view names[] = {"produce",    "offload", "fetch",   "compute",
                                        "merge",      "finalize", "delta",  "zero",
                                        "write_back", "sink",    "release", "exchange"};
  return names[static_cast<int>(k)];
}

//! The device rings a step may use (see the file comment).
enum class ring : std::uint8_t {
  q,   //!< query side: q_i (forward) or the query-side bundle (backward)
  kv,  //!< k_j and v_j
  out, //!< forward: out_i and lse_i staged for offload and the sink
};
//! Number of rings.
inline constexpr int ring_count = 3;

//! Which tensors of a chunk a copy or sink step moves.
enum class payload : std::uint8_t {
  none,    //!< not a data movement
  q,       //!< q_i
  kv,      //!< k_j and v_j
  out_lse, //!< out_i and lse_i
  q_side,  //!< backward: q_i, out_i, lse_i from host and dout_i from the caller (first use)
  q_side_dq, //!< backward: q_i, out_i, lse_i, dout_i and the dq_i accumulator from host
  dq,      //!< the dq_i accumulator
  dq_dout, //!< backward write-back at query chunk i's first use: dq_i and dout_i, so later
           //!< fetches take dout_i from host instead of the caller (and its all-to-all)
  dkv,     //!< dk_j and dv_j
  qkv,     //!< P > 1, forward exchange: q_i, k_i and v_i (sequence-to-head into their slots)
  q_out_lse, //!< P > 1, backward fetch at query chunk i's first use: q_i, out_i, lse_i from
             //!< host (dout_i arrives by its own exchange)
  dout,    //!< P > 1, backward exchange: dout_i from the caller, sequence-to-head into its slot
};

//! Whether an exchange step of payload `what` fills a slot (sequence-to-head: `qkv`, `dout`)
//! rather than reading one or an accumulator (head-to-sequence: `out_lse`, `dq`, `dkv`).
[[nodiscard]] constexpr bool exchange_fills_slot(payload what) noexcept {
  return what == payload::qkv || what == payload::dout;
}

//! One step of a schedule.
struct schedule_step {
  step_kind kind = step_kind::release; //!< what it does
  lane on = lane::compute;             //!< the lane (stream) it runs on; ignored for `release`
  payload what = payload::none;        //!< tensors moved (copies, sinks)
  std::int32_t i = -1;                 //!< query chunk index, or -1
  std::int32_t j = -1;                 //!< key/value chunk index, or -1
  //! Slot used in each ring (indexed by `ring`), -1 when the step does not touch that ring.
  std::array<std::int32_t, ring_count> slot{-1, -1, -1};
  std::uint64_t bytes = 0;   //!< bytes the step moves (copies) or writes (compute), for the trace
  std::uint32_t deps_begin = 0; //!< first index of this step's dependencies in `schedule::deps`
  std::uint32_t deps_count = 0; //!< number of dependencies

  //! The slot of ring `r`, or -1.
  [[nodiscard]] std::int32_t slot_of(ring r) const noexcept { return slot[static_cast<int>(r)]; }
};

//! Sizes of one chunk's device buffers in bytes, per ring slot (each slot is one allocation).
struct slot_bytes {
  std::size_t q = 0;   //!< a `ring::q` slot
  std::size_t kv = 0;  //!< a `ring::kv` slot
  std::size_t out = 0; //!< a `ring::out` slot
};

//! What a schedule is built from.
struct schedule_params {
  index_t chunks = 1;         //!< u = S / C, the number of chunks (>= 1)
  index_t ranks = 1;          //!< P: more than 1 adds the exchange steps
  //! The mask, by global position (chunk c holds positions [c C, (c + 1) C)): causal
  //! (u(u+1)/2 pairs) or full (u^2 pairs); with a sliding window, chunk pairs with no visible
  //! (query, key) pair are left out (`key_chunks_of`).
  attention_mask mask = causal_mask;
  //! Owns the mask's document offsets, when it has documents and was built from an
  //! `attention_problem` (which sets both), so a schedule never points at freed offsets.
  std::shared_ptr<std::vector<index_t> const> documents{};
  //! C, tokens per chunk: where the window's edges fall; needed (>= 1) with a window. 0 without
  //! one: every pair is whole, and the cost model prices a causal diagonal pair at half.
  index_t chunk_tokens = 0;
  bool offload = true;        //!< offload to pinned host memory, or keep every chunk on the device
  index_t ring_slots = 2;     //!< staging slots of the rotating ring (2 = double buffering)
  slot_bytes bytes{};         //!< slot sizes, for the trace and the memory prediction
  std::uint64_t q_bytes = 0;  //!< bytes of q_i (copies of q)
  std::uint64_t kv_bytes = 0; //!< bytes of k_j plus v_j
  std::uint64_t out_bytes = 0;     //!< bytes of out_i plus lse_i
  std::uint64_t q_side_bytes = 0;  //!< backward: bytes of q_i, out_i, lse_i and dout_i
  std::uint64_t dout_bytes = 0;    //!< backward: bytes of dout_i (in q_side_bytes)
  std::uint64_t dq_bytes = 0;      //!< bytes of the fp32 dq_i accumulator
  std::uint64_t dkv_bytes = 0;     //!< bytes of the fp32 dk_j plus dv_j
  //! Bytes each rank sends (and receives) in an exchange step are those of what it moves, in the
  //! layouts above: `q_bytes + kv_bytes` (qkv), `out_bytes`, `dout_bytes`, `dq_bytes`, `dkv_bytes`.
};

//! An inclusive range [first, last] of chunk indices.
struct chunk_span {
  std::int32_t first = 0; //!< first chunk
  std::int32_t last = -1; //!< last chunk (inclusive)
};

//! The key chunks that query chunk `i` sees at least one key of under `p.mask`: one range, since
//! every query sees a contiguous range of keys that contains itself and both ends of that range
//! never decrease with the query's position. The schedules compute exactly these pairs.
[[nodiscard]] inline chunk_span key_chunks_of(schedule_params const& p, index_t i) noexcept {
  bool const causal = p.mask.kind == mask_kind::causal;
  auto const u = p.chunks;
  index_t first = 0, last = causal ? i : u - 1;
  if (index_t const c = p.chunk_tokens; c > 0) {
    index_t const b = p.mask.visible_keys(i * c).begin; // the chunk's first row sees the least
    if (b > 0) first = std::min(b / c, i);
    if (!causal) {
      index_t const e = p.mask.visible_keys(i * c + c - 1).end; // its last row the most
      if (e < u * c) last = std::max((e - 1) / c, i);
    }
  }
  return {static_cast<std::int32_t>(first), static_cast<std::int32_t>(last)};
}

//! The query chunks that see at least one key of key chunk `j`: the i with `j` in
//! `key_chunks_of(p, i)` (one range, as both ends of those ranges never decrease with i).
[[nodiscard]] inline chunk_span query_chunks_of(schedule_params const& p, index_t j) noexcept {
  index_t lo = 0, hi = p.chunks; // first i whose last key chunk is >= j
  while (lo < hi) {
    index_t const m = lo + (hi - lo) / 2;
    if (key_chunks_of(p, m).last >= j) hi = m;
    else lo = m + 1;
  }
  index_t const first = lo;
  lo = first, hi = p.chunks; // first i whose first key chunk is > j
  while (lo < hi) {
    index_t const m = lo + (hi - lo) / 2;
    if (key_chunks_of(p, m).first > j) hi = m;
    else lo = m + 1;
  }
  return {static_cast<std::int32_t>(first), static_cast<std::int32_t>(lo - 1)};
}

//! The fraction of the C x C (query, key) pairs of chunk pair (i, j) that the mask leaves
//! visible (`attention_mask::visible_pairs`); the work of its compute step relative to a whole
//! pair. Without `chunk_tokens`: 1, or 0.5 for a causal diagonal pair.
[[nodiscard]] inline double visible_fraction(schedule_params const& p, index_t i, index_t j) noexcept {
  index_t const c = p.chunk_tokens;
  if (c <= 0) return p.mask.kind == mask_kind::causal && i == j ? 0.5 : 1.0;
  double const whole = static_cast<double>(c) * static_cast<double>(c);
  return p.mask.visible_pairs(i * c, c, j * c, c) / whole;
}

//! The key chunk of query chunk i's first compute step in the forward schedule, whose partial
//! result starts the merge: the diagonal for causal masks (computed first, on the fresh chunk),
//! else the first key chunk it sees.
[[nodiscard]] inline index_t forward_first_key_chunk(schedule_params const& p, index_t i) noexcept {
  return p.mask.kind == mask_kind::causal ? i : key_chunks_of(p, i).first;
}

//! A schedule: the steps of one pass, in issue order, and their dependencies.
struct schedule {
  pass which = pass::forward;             //!< forward or backward
  schedule_params params{};               //!< what it was built from
  std::array<index_t, ring_count> ring_size{}; //!< slots of each ring
  std::vector<schedule_step> steps;       //!< in issue order (per lane: FIFO order)
  std::vector<std::uint32_t> deps;        //!< dependency indices, each < the depending step's

  //! The dependencies of step `s`.
  [[nodiscard]] std::span<std::uint32_t const> deps_of(std::size_t s) const noexcept {
    return {deps.data() + steps[s].deps_begin, steps[s].deps_count};
  }
  //! Number of steps of kind `k`.
  [[nodiscard]] std::size_t count(step_kind k) const noexcept {
    return static_cast<std::size_t>(
        std::count_if(steps.begin(), steps.end(), [k](schedule_step const& s) { return s.kind == k; }));
  }
  //! Device bytes the schedule's rings occupy: the sum over rings of slots x slot bytes, each
  //! slot rounded up to `granularity` (the arena's allocation unit). This is the peak the
  //! executor's arena reports for the rings.
  [[nodiscard]] std::size_t ring_bytes(std::size_t granularity = 256) const noexcept {
    auto round = [granularity](std::size_t b) { return (b + granularity - 1) / granularity * granularity; };
    std::size_t const per[ring_count] = {params.bytes.q, params.bytes.kv, params.bytes.out};
    std::size_t total = 0;
    for (int r = 0; r < ring_count; ++r)
      total += static_cast<std::size_t>(ring_size[static_cast<std::size_t>(r)]) * round(per[r]);
    return total;
  }
};

//! Slots of each ring (indexed by `ring`) of the schedule of pass `which` built from `p`: with
//! offload, forward {1, ring_slots, 1} and backward {ring_slots, 2, 0}; without, u slots for each
//! ring the pass uses (chunk c stays in slot c). On P > 1 ranks with offload the forward has
//! {2, ring_slots + 2, 1}: the q/k/v exchange of chunk i + 1 runs during chunk i, into a second q
//! slot and one of two kv slots kept for exchanged chunks (the last two), outside the fetches'
//! rotation. The builders size their rings with this, and the memory predictions
//! (`attention_problem`) read it, so both hold the same number.
[[nodiscard]] constexpr std::array<index_t, ring_count> ring_sizes(pass which,
                                                                  schedule_params const& p) noexcept {
  if (which == pass::forward && p.offload && p.ranks > 1)
    return {2, p.ring_slots + 2, 1};
  if (which == pass::forward)
    return p.offload ? std::array<index_t, ring_count>{1, p.ring_slots, 1}
                     : std::array<index_t, ring_count>{p.chunks, p.chunks, p.chunks};
  return p.offload ? std::array<index_t, ring_count>{p.ring_slots, 2, 0}
                   : std::array<index_t, ring_count>{p.chunks, p.chunks, 0};
}

namespace detail::sched {

// Builds steps and round-robin slot assignment; each slot remembers the release step of its
// current content so the next load waits for it.
struct builder {
  schedule s;
  std::array<std::vector<std::int64_t>, ring_count> last_release{}; // per slot, -1: never used
  std::array<index_t, ring_count> next{};                            // round-robin cursor
  std::array<index_t, ring_count> rotation{}; // slots [0, rotation) are handed out round robin
  index_t fresh = 0;                          // cursor over the kv slots past the rotation

  std::uint32_t add(schedule_step st, std::initializer_list<std::int64_t> deps) {
    st.deps_begin = static_cast<std::uint32_t>(s.deps.size());
    for (std::int64_t d : deps)
      if (d >= 0) s.deps.push_back(static_cast<std::uint32_t>(d));
    st.deps_count = static_cast<std::uint32_t>(s.deps.size()) - st.deps_begin;
    s.steps.push_back(st);
    return static_cast<std::uint32_t>(s.steps.size() - 1);
  }
  void rings(std::array<index_t, ring_count> sizes) {
    s.ring_size = sizes;
    rotation = sizes;
    for (int r = 0; r < ring_count; ++r)
      last_release[static_cast<std::size_t>(r)].assign(static_cast<std::size_t>(s.ring_size[static_cast<std::size_t>(r)]), -1);
  }
  // The next slot of ring r (round robin), and the release step its previous content left.
  std::pair<std::int32_t, std::int64_t> take(ring r) {
    auto const ri = static_cast<std::size_t>(r);
    auto const slot = static_cast<std::int32_t>(next[ri]);
    next[ri] = (next[ri] + 1) % rotation[ri];
    return {slot, last_release[ri][static_cast<std::size_t>(slot)]};
  }
  // The next kv slot past the rotation (P > 1: slots kept for exchanged chunks), alternating.
  std::pair<std::int32_t, std::int64_t> take_fresh() {
    auto const ri = static_cast<std::size_t>(ring::kv);
    index_t const extra = s.ring_size[ri] - rotation[ri];
    auto const slot = static_cast<std::int32_t>(rotation[ri] + fresh);
    fresh = (fresh + 1) % extra;
    return {slot, last_release[ri][static_cast<std::size_t>(slot)]};
  }
  // take(r) with offload; without it chunk c lives in slot c for the whole pass (nothing to wait).
  std::pair<std::int32_t, std::int64_t> take_or_resident(ring r, bool offload, std::int32_t chunk) {
    return offload ? take(r) : std::pair<std::int32_t, std::int64_t>{chunk, -1};
  }
  // A release marker for (ring r, slot) standing for `deps`.
  void release(ring r, std::int32_t slot, std::int32_t i, std::int32_t j,
               std::initializer_list<std::int64_t> deps) {
    schedule_step st;
    st.kind = step_kind::release;
    st.i = i;
    st.j = j;
    st.slot[static_cast<std::size_t>(r)] = slot;
    last_release[static_cast<std::size_t>(r)][static_cast<std::size_t>(slot)] = add(st, deps);
  }
};

inline schedule_step make(step_kind k, lane on, payload what, std::int32_t i, std::int32_t j,
                          std::uint64_t bytes) {
  schedule_step st;
  st.kind = k;
  st.on = on;
  st.what = what;
  st.i = i;
  st.j = j;
  st.bytes = bytes;
  return st;
}

[[nodiscard]] inline status check_params(schedule_params const& p, char const* who) {
  if (p.ranks < 1)
    return make_error(errc::invalid_argument, who, ": ranks P = ", p.ranks, " must be >= 1");
  if (p.chunks < 1 || p.chunks > (index_t{1} << 20))
    return make_error(errc::invalid_argument, who, ": the number of chunks u = ", p.chunks,
                      " must be in [1, 2^20]");
  if (p.offload && (p.ring_slots < 2 || p.ring_slots > 64))
    return make_error(errc::invalid_argument, who, ": ring_slots = ", p.ring_slots,
                      " must be in [2, 64] (2 is double buffering)");
  FPDT_TRY(check_mask(p.mask, who));
  if (p.mask.limits_by_position() && p.chunk_tokens < 1)
    return make_error(errc::invalid_argument, who, ": the mask (", to_string(p.mask),
                      ") has a window or documents, so chunk_tokens (C) must be >= 1, not ", p.chunk_tokens);
  if (p.chunk_tokens < 0 || (p.chunk_tokens > 0 && p.chunk_tokens > (index_t{1} << 62) / p.chunks))
    return make_error(errc::invalid_argument, who, ": chunk_tokens C = ", p.chunk_tokens, " with u = ",
                      p.chunks, " chunks: C must be >= 0 and u C below 2^62");
  if (p.mask.documents > 0) FPDT_TRY(check_documents(p.mask, p.chunks * p.chunk_tokens, who));
  return {};
}

} // namespace detail::sched

//! The forward schedule of FPDT attention on one rank (docs/design.md 2.2).
//!
//! Per query chunk i: produce q_i, k_i, v_i (compute lane); with offload, offload them (d2h) as
//! soon as they exist; compute the diagonal pair (i, i) on the fresh k_i, v_i, then fetch
//! k_j, v_j (h2d) for the other j of `key_chunks_of(p, i)` in increasing order (causal without a
//! window: j < i; full: every j != i; chunks a window leaves empty are skipped) through the kv ring, each
//! fetch waiting only for the release of the slot it reuses, so fetch j+1 overlaps compute j;
//! merge each partial into the accumulator; finalize out_i and lse_i into the out slot, offload
//! them and hand out_i to the sink. On P > 1 ranks (`ranks`) the caller's source writes the local
//! piece of chunk i on the comm lane, an `exchange` step (payload `qkv`) scatters it into the q
//! and kv slots, and after finalize an `exchange` (`out_lse`) reads the out slot back to the
//! sequence layout before the sink, both on the comm lane, so the output exchange of chunk i and
//! the caller's sink overlap chunk i + 1's compute; the source and q/k/v exchange of chunk i + 1
//! are issued before chunk i's pairs (causal), so they overlap chunk i's compute (see
//! `ring_sizes` for the slots this takes). Errors: `errc::invalid_argument` naming
//! `chunks`, `ranks` or `ring_slots` when out of range.
[[nodiscard]] inline result<schedule> forward_schedule(schedule_params const& p) {
  FPDT_TRY(detail::sched::check_params(p, "forward_schedule"));
  using detail::sched::make;
  detail::sched::builder b;
  b.s.which = pass::forward;
  b.s.params = p;
  auto const u = static_cast<std::int32_t>(p.chunks);
  b.rings(ring_sizes(pass::forward, p));
  std::vector<std::int64_t> kv_offload(static_cast<std::size_t>(u), -1);
  std::vector<std::int64_t> q_offload(static_cast<std::size_t>(u), -1);
  std::vector<std::int64_t> produced_at(static_cast<std::size_t>(u), -1);
  // produce(c) into fresh q and kv slots, offloading both when offload is on. Returns the slots.
  bool const spread = p.ranks > 1;
  if (spread && p.offload) b.rotation[static_cast<std::size_t>(ring::kv)] = p.ring_slots;
  auto produce = [&](std::int32_t c, bool release_q) {
    auto [qs, q_free] = b.take_or_resident(ring::q, p.offload, c);
    auto [ks, k_free] = spread && p.offload ? b.take_fresh() : b.take_or_resident(ring::kv, p.offload, c);
    std::int64_t produced = -1;
    if (spread) { // the local piece into the exchange's send block, then the exchange into the slots
      auto prod = make(step_kind::produce, lane::comm, payload::none, c, c, p.q_bytes + p.kv_bytes);
      std::int64_t const local = b.add(prod, {});
      auto ex = make(step_kind::exchange, lane::comm, payload::qkv, c, c, p.q_bytes + p.kv_bytes);
      ex.slot = {qs, ks, -1};
      produced = b.add(ex, {local, q_free, k_free});
    } else {
      auto prod = make(step_kind::produce, lane::compute, payload::none, c, c, p.q_bytes + p.kv_bytes);
      prod.slot = {qs, ks, -1};
      produced = b.add(prod, {q_free, k_free});
    }
    produced_at[static_cast<std::size_t>(c)] = produced;
    if (p.offload) {
      auto off = make(step_kind::offload, lane::d2h, payload::q, c, -1, p.q_bytes);
      off.slot = {qs, -1, -1};
      q_offload[static_cast<std::size_t>(c)] = b.add(off, {produced});
      off = make(step_kind::offload, lane::d2h, payload::kv, -1, c, p.kv_bytes);
      off.slot = {-1, ks, -1};
      kv_offload[static_cast<std::size_t>(c)] = b.add(off, {produced});
      if (release_q) b.release(ring::q, qs, c, -1, {q_offload[static_cast<std::size_t>(c)]});
    }
    return std::pair{qs, ks};
  };
  // Full attention: query chunk 0 needs every key chunk, so all chunks are produced (and
  // offloaded) first; causal attention interleaves, chunk i being produced at the start of i.
  bool const causal = p.mask.kind == mask_kind::causal;
  if (!causal)
    for (std::int32_t c = 0; c < u; ++c) {
      auto [qs, ks] = produce(c, true);
      (void)qs;
      if (p.offload) b.release(ring::kv, ks, -1, c, {kv_offload[static_cast<std::size_t>(c)]});
    }
  // Causal: the slots chunk c was produced into (P > 1 produces one chunk ahead).
  std::vector<std::pair<std::int32_t, std::int32_t>> produced_slots(static_cast<std::size_t>(u));
  if (causal && spread) produced_slots[0] = produce(0, false);
  for (std::int32_t i = 0; i < u; ++i) {
    std::int32_t qs = i, fresh_kv = -1;
    std::int64_t q_ready = produced_at[static_cast<std::size_t>(i)];
    if (causal) {
      if (!spread) produced_slots[static_cast<std::size_t>(i)] = produce(i, false);
      else if (i + 1 < u) produced_slots[static_cast<std::size_t>(i + 1)] = produce(i + 1, false);
      qs = produced_slots[static_cast<std::size_t>(i)].first;
      fresh_kv = produced_slots[static_cast<std::size_t>(i)].second;
      q_ready = produced_at[static_cast<std::size_t>(i)];
    } else if (p.offload) {
      auto [q_slot, q_free] = b.take(ring::q);
      qs = q_slot;
      auto f = make(step_kind::fetch, lane::h2d, payload::q, i, -1, p.q_bytes);
      f.slot = {qs, -1, -1};
      q_ready = b.add(f, {q_free, q_offload[static_cast<std::size_t>(i)]});
    }
    std::int64_t last_compute = -1;
    auto pair = [&](std::int32_t j, std::int32_t kv_slot, std::int64_t ready) {
      auto c = make(step_kind::compute, lane::compute, payload::none, i, j, 0);
      c.slot = {qs, kv_slot, -1};
      std::int64_t const comp = b.add(c, {q_ready, ready});
      auto m = make(step_kind::merge, lane::compute, payload::none, i, j, 0);
      b.add(m, {comp});
      last_compute = comp;
      return comp;
    };
    if (causal) { // the diagonal first, on the fresh chunk
      std::int64_t const diag = pair(i, fresh_kv, q_ready);
      if (p.offload)
        b.release(ring::kv, fresh_kv, -1, i, {diag, kv_offload[static_cast<std::size_t>(i)]});
    }
    chunk_span const seen = key_chunks_of(p, i);
    for (std::int32_t j = seen.first; j <= seen.last; ++j) {
      if (causal && j >= i) continue;
      if (p.offload) {
        auto [s2, free] = b.take(ring::kv);
        auto f = make(step_kind::fetch, lane::h2d, payload::kv, -1, j, p.kv_bytes);
        f.slot = {-1, s2, -1};
        std::int64_t const fetched = b.add(f, {free, kv_offload[static_cast<std::size_t>(j)]});
        std::int64_t const comp = pair(j, s2, fetched);
        b.release(ring::kv, s2, -1, j, {comp});
      } else {
        pair(j, j, produced_at[static_cast<std::size_t>(j)]);
      }
    }
    auto [os, o_free] = b.take_or_resident(ring::out, p.offload, i);
    auto fin = make(step_kind::finalize, lane::compute, payload::out_lse, i, -1, p.out_bytes);
    fin.slot = {-1, -1, os};
    std::int64_t const finalized = b.add(fin, {last_compute, o_free});
    std::int64_t out_read = -1; // the last reader of the out slot besides its offload
    if (spread) {
      auto ex = make(step_kind::exchange, lane::comm, payload::out_lse, i, -1, p.out_bytes);
      ex.slot = {-1, -1, os};
      out_read = b.add(ex, {finalized});
      auto snk = make(step_kind::sink, lane::comm, payload::out_lse, i, -1, p.out_bytes);
      b.add(snk, {out_read});
    } else {
      auto snk = make(step_kind::sink, lane::compute, payload::out_lse, i, -1, p.out_bytes);
      snk.slot = {-1, -1, os};
      out_read = b.add(snk, {finalized});
    }
    if (p.offload) {
      auto off = make(step_kind::offload, lane::d2h, payload::out_lse, i, -1, p.out_bytes);
      off.slot = {-1, -1, os};
      std::int64_t const o_off = b.add(off, {finalized});
      b.release(ring::out, os, i, -1, {out_read, o_off});
      b.release(ring::q, qs, i, -1, {last_compute, q_offload[static_cast<std::size_t>(i)]});
    }
  }
  return std::move(b.s);
}

//! dk/dv accumulator pairs one rank's backward holds: on P > 1 ranks two, which key chunks use in
//! turn (j % 2) while the other is exchanged (`backward_schedule`); one on a single rank.
[[nodiscard]] constexpr std::size_t dkv_accumulator_pairs(index_t ranks) noexcept { return ranks > 1 ? 2 : 1; }

//! The backward schedule of FPDT attention on one rank (docs/design.md 2.3).
//!
//! Per key/value chunk j (outer loop): fetch k_j, v_j into the 2-slot kv ring (k_{j+1} is fetched
//! while j's inner loop runs) and zero the fp32 dk_j, dv_j accumulators; per query chunk i of
//! `query_chunks_of(p, j)` (causal without a window: i >= j; full: every i): fetch the query-side
//! bundle of i (q_i, out_i, lse_i from host; dout_i from the caller at i's first use, its first
//! key chunk (j == 0 without a window), and from host after it; dq_i from host after its first
//! use, else zero it), compute delta_i, compute the pair's backward, then write dq_i back (d2h;
//! at the first use dout_i with it), or hand it to the sink at its last use, its last key chunk
//! (causal: j == i; full without a window: j == u - 1). After the inner loop dk_j and dv_j go to the sink. So the caller's
//! dout source (and, on P ranks, dout's all-to-all) runs once per chunk, with offload or without.
//! On P > 1 ranks dout_i's first use is an `exchange` (payload `dout`) into the bundle's slot on
//! the comm lane, after the fetch of q_i, out_i, lse_i (payload `q_out_lse`; none without
//! offload: they are resident), and the final dq_i, dk_j and dv_j go back by `exchange` steps on
//! the comm lane, each followed there by its sink; dk_j, dv_j then alternate between two
//! accumulator pairs (j % 2), so zeroing the next pair waits for the exchange of j - 1, not of j.
//! Errors: as `forward_schedule`.
[[nodiscard]] inline result<schedule> backward_schedule(schedule_params const& p) {
  FPDT_TRY(detail::sched::check_params(p, "backward_schedule"));
  using detail::sched::make;
  detail::sched::builder b;
  b.s.which = pass::backward;
  b.s.params = p;
  auto const u = static_cast<std::int32_t>(p.chunks);
  b.rings(ring_sizes(pass::backward, p));
  bool const spread = p.ranks > 1;
  std::vector<std::int64_t> dq_written(static_cast<std::size_t>(u), -1);
  std::int64_t prev_dkv_sink = -1;
  // P > 1: the last exchange out of each pair. (Sized by the call: with a constexpr local as the
  // size, nvcc 13 failed on the next std::array in a header included after this one.)
  std::array<std::int64_t, dkv_accumulator_pairs(2)> dkv_exchanged{};
  dkv_exchanged.fill(-1);
  std::size_t const pairs = dkv_exchanged.size();
  for (std::int32_t j = 0; j < u; ++j) {
    auto [ks, k_free] = b.take_or_resident(ring::kv, p.offload, j);
    std::int64_t kv_ready = -1;
    if (p.offload) {
      auto f = make(step_kind::fetch, lane::h2d, payload::kv, -1, j, p.kv_bytes);
      f.slot = {-1, ks, -1};
      kv_ready = b.add(f, {k_free});
    }
    auto z = make(step_kind::zero, lane::compute, payload::dkv, -1, j, p.dkv_bytes);
    std::int64_t const zeroed = b.add(z, {spread ? dkv_exchanged[static_cast<std::size_t>(j) % pairs] : prev_dkv_sink});
    std::int64_t last_compute = -1;
    chunk_span const seen_by = query_chunks_of(p, j);
    for (std::int32_t i = seen_by.first; i <= seen_by.last; ++i) {
      chunk_span const seen = key_chunks_of(p, i);
      bool const first = j == seen.first; // i's first and last pair
      bool const last = j == seen.last;
      auto [qs, q_free] = b.take_or_resident(ring::q, p.offload, i);
      std::int64_t q_ready = -1;
      if (spread && first) { // q_i, out_i, lse_i from host (with offload), dout_i by its exchange
        std::int64_t fetched = q_free;
        if (p.offload) {
          auto f = make(step_kind::fetch, lane::h2d, payload::q_out_lse, i, -1, p.q_side_bytes - p.dout_bytes);
          f.slot = {qs, -1, -1};
          fetched = b.add(f, {q_free});
        }
        auto ex = make(step_kind::exchange, lane::comm, payload::dout, i, -1, p.dout_bytes);
        ex.slot = {qs, -1, -1};
        q_ready = b.add(ex, {fetched});
      } else if (p.offload || first) {
        // Offload off: the bundle's slot i is filled once, at first use (dout_i from the caller).
        payload const what = (p.offload && !first) ? payload::q_side_dq : payload::q_side;
        auto f = make(step_kind::fetch, lane::h2d, what, i, -1,
                      p.q_side_bytes + (what == payload::q_side_dq ? p.dq_bytes : 0));
        f.slot = {qs, -1, -1};
        q_ready = b.add(f, {q_free, what == payload::q_side_dq ? dq_written[static_cast<std::size_t>(i)] : -1});
      }
      std::int64_t dq_ready = q_ready;
      if (first) {
        auto zq = make(step_kind::zero, lane::compute, payload::dq, i, -1, p.dq_bytes);
        zq.slot = {qs, -1, -1};
        dq_ready = b.add(zq, {q_ready});
        auto d = make(step_kind::delta, lane::compute, payload::none, i, -1, 0);
        d.slot = {qs, -1, -1};
        dq_ready = b.add(d, {dq_ready});
      } else if (p.offload) {
        auto d = make(step_kind::delta, lane::compute, payload::none, i, -1, 0);
        d.slot = {qs, -1, -1};
        dq_ready = b.add(d, {q_ready});
      }
      auto c = make(step_kind::compute, lane::compute, payload::none, i, j, 0);
      c.slot = {qs, ks, -1};
      std::int64_t const comp = b.add(c, {dq_ready, kv_ready, zeroed});
      last_compute = comp;
      std::int64_t done = comp;
      if (last && spread) {
        auto ex = make(step_kind::exchange, lane::comm, payload::dq, i, -1, p.dq_bytes);
        ex.slot = {qs, -1, -1};
        done = b.add(ex, {comp});
        b.add(make(step_kind::sink, lane::comm, payload::dq, i, -1, p.dq_bytes), {done});
      } else if (last) {
        auto snk = make(step_kind::sink, lane::compute, payload::dq, i, -1, p.dq_bytes);
        snk.slot = {qs, -1, -1};
        done = b.add(snk, {comp});
      } else if (p.offload) {
        payload const wbw = first ? payload::dq_dout : payload::dq;
        auto wb = make(step_kind::write_back, lane::d2h, wbw, i, -1, p.dq_bytes + (first ? p.dout_bytes : 0));
        wb.slot = {qs, -1, -1};
        done = b.add(wb, {comp});
        dq_written[static_cast<std::size_t>(i)] = done;
      }
      if (p.offload) b.release(ring::q, qs, i, -1, {comp, done});
    }
    if (spread) { // the next zero of the accumulators waits for the exchange that reads them
      auto ex = make(step_kind::exchange, lane::comm, payload::dkv, -1, j, p.dkv_bytes);
      dkv_exchanged[static_cast<std::size_t>(j) % pairs] = b.add(ex, {last_compute, zeroed});
      b.add(make(step_kind::sink, lane::comm, payload::dkv, -1, j, p.dkv_bytes),
            {dkv_exchanged[static_cast<std::size_t>(j) % pairs]});
    } else {
      auto snk = make(step_kind::sink, lane::compute, payload::dkv, -1, j, p.dkv_bytes);
      prev_dkv_sink = b.add(snk, {last_compute, zeroed});
    }
    if (p.offload) b.release(ring::kv, ks, -1, j, {last_compute});
  }
  return std::move(b.s);
}

//! Proves a schedule safe; returns the first violation found, naming the step:
//! - every dependency refers to an earlier step; lanes of copies are h2d/d2h, of exchanges comm,
//!   of produce and sink steps comm on P > 1 ranks (compute for P = 1), of the rest compute;
//!   exchange steps appear only on P > 1 ranks;
//! - every slot index lies inside its ring (so peak slots <= ring size);
//! - every compute step's operands are resident: the q slot holds query chunk i and the kv slot
//!   key chunk j, loaded by a step that happens before it;
//! - no slot is reloaded (produce or fetch) before every reader of its previous content happens
//!   before the reload;
//! - every fetch of a chunk from host happens after the offload (or write-back) that wrote it, when
//!   that was in the same pass (for a q_side_dq fetch: of dq_i and of dout_i);
//! - exchanges into a slot (qkv) load it like a fetch; an exchange of dout_i writes part of a slot
//!   that must hold chunk i, and every later reader of the slot happens after it; exchanges out of
//!   a slot (out_lse, dq) are readers, so the slot is not reloaded before they are done;
//! - on P > 1 ranks every sink happens after the exchange of its payload and chunk.
//! "Happens before" is the transitive closure of the listed dependencies and lane FIFO order.
//! Errors: `errc::internal` describing the violation.
[[nodiscard]] inline status check_schedule(schedule const& s) {
  std::size_t const n = s.steps.size();
  std::size_t const words = (n + 63) / 64;
  std::vector<std::uint64_t> hb(n * words, 0); // hb[b] bit a: a happens before b
  auto before = [&](std::size_t a, std::size_t b2) {
    return (hb[b2 * words + a / 64] >> (a % 64)) & 1u;
  };
  auto merge_into = [&](std::size_t dst, std::size_t src) {
    for (std::size_t w = 0; w < words; ++w)
      hb[dst * words + w] |= hb[src * words + w];
    hb[dst * words + src / 64] |= std::uint64_t{1} << (src % 64);
  };
  std::array<std::int64_t, 4> last_on_lane{-1, -1, -1, -1}; // indexed by lane
  auto describe = [&](std::size_t k) {
    schedule_step const& st = s.steps[k];
    return detail::concat("step ", k, " (", to_string(st.kind), " i=", st.i, " j=", st.j, ")");
  };
  for (std::size_t k = 0; k < n; ++k) {
    schedule_step const& st = s.steps[k];
    for (std::uint32_t d : s.deps_of(k)) {
      if (d >= k)
        return make_error(errc::internal, "schedule: ", describe(k), " depends on later step ", d);
      merge_into(k, d);
    }
    if (st.kind == step_kind::exchange && s.params.ranks < 2)
      return make_error(errc::internal, "schedule: ", describe(k), " exchanges on P = ",
                        s.params.ranks, " rank");
    if (st.kind != step_kind::release) {
      bool const copy_lane = st.kind == step_kind::fetch || st.kind == step_kind::offload ||
                             st.kind == step_kind::write_back;
      bool const comm_lane = st.kind == step_kind::exchange ||
                             (s.params.ranks > 1 && (st.kind == step_kind::produce || st.kind == step_kind::sink));
      lane const want = st.kind == step_kind::fetch ? lane::h2d
                        : copy_lane                 ? lane::d2h
                        : comm_lane                 ? lane::comm
                                                    : lane::compute;
      if (st.on != want)
        return make_error(errc::internal, "schedule: ", describe(k), " runs on lane ",
                          to_string(st.on), ", expected ", to_string(want));
      auto& last = last_on_lane[static_cast<std::size_t>(st.on)];
      if (last >= 0) merge_into(k, static_cast<std::size_t>(last));
      last = static_cast<std::int64_t>(k);
    }
    for (int r = 0; r < ring_count; ++r) {
      std::int32_t const slot = st.slot[static_cast<std::size_t>(r)];
      if (slot < -1 || slot >= s.ring_size[static_cast<std::size_t>(r)])
        return make_error(errc::internal, "schedule: ", describe(k), " uses slot ", slot,
                          " of ring ", r, " which has ", s.ring_size[static_cast<std::size_t>(r)],
                          " slots");
    }
  }
  // Slot contents in issue order: (content chunk, loading step, readers since the load).
  struct content {
    std::int32_t chunk = -1;
    std::int64_t loaded_by = -1;
    std::vector<std::size_t> readers;
    std::vector<std::size_t> parts; // exchanges that wrote part of it (dout) since the load
  };
  std::array<std::vector<content>, ring_count> slots;
  // Without offload the backward finds every chunk's q and kv where the forward left them.
  constexpr std::int64_t preloaded = -2;
  bool const resident = s.which == pass::backward && !s.params.offload;
  for (int r = 0; r < ring_count; ++r) {
    auto& ring_slots = slots[static_cast<std::size_t>(r)];
    ring_slots.resize(static_cast<std::size_t>(s.ring_size[static_cast<std::size_t>(r)]));
    for (std::size_t slot = 0; resident && slot < ring_slots.size(); ++slot) {
      ring_slots[slot].chunk = static_cast<std::int32_t>(slot);
      ring_slots[slot].loaded_by = preloaded;
    }
  }
  // Host copies written in this pass: payload kind x chunk -> step that wrote it.
  std::vector<std::int64_t> kv_host(static_cast<std::size_t>(s.params.chunks), -1);
  std::vector<std::int64_t> dq_host(static_cast<std::size_t>(s.params.chunks), -1);
  std::vector<std::int64_t> dout_host(static_cast<std::size_t>(s.params.chunks), -1);
  // The last exchange step of each payload and chunk.
  static_assert(static_cast<int>(payload::dout) < 16);
  std::array<std::vector<std::int64_t>, 16> exchanged;
  for (auto& e : exchanged) e.assign(static_cast<std::size_t>(s.params.chunks), -1);
  for (std::size_t k = 0; k < n; ++k) {
    schedule_step const& st = s.steps[k];
    if (st.kind == step_kind::release) continue;
    for (int r = 0; r < ring_count; ++r) {
      std::int32_t const slot = st.slot[static_cast<std::size_t>(r)];
      if (slot < 0) continue;
      bool const loads = st.kind == step_kind::produce || st.kind == step_kind::fetch ||
                         (st.kind == step_kind::exchange && st.what == payload::qkv) ||
                         (st.kind == step_kind::finalize && r == static_cast<int>(ring::out));
      content& c = slots[static_cast<std::size_t>(r)][static_cast<std::size_t>(slot)];
      if (loads) {
        for (std::size_t reader : c.readers)
          if (!before(reader, k))
            return make_error(errc::internal, "schedule: ", describe(k), " reloads slot ", slot,
                              " of ring ", r, " before its reader ", describe(reader), " is done");
        c.chunk = r == static_cast<int>(ring::kv) ? st.j : st.i;
        c.loaded_by = static_cast<std::int64_t>(k);
        c.readers.clear();
        c.parts.clear();
      } else {
        std::int32_t const want = r == static_cast<int>(ring::kv) ? st.j : st.i;
        bool const loaded = c.loaded_by == preloaded ||
                            (c.loaded_by >= 0 && before(static_cast<std::size_t>(c.loaded_by), k));
        if (!loaded ||
            (want >= 0 && c.chunk != want))
          return make_error(errc::internal, "schedule: ", describe(k), " reads slot ", slot,
                            " of ring ", r, " which does not hold chunk ", want,
                            " loaded before it (it holds chunk ", c.chunk, ")");
        for (std::size_t part : c.parts)
          if (!before(part, k))
            return make_error(errc::internal, "schedule: ", describe(k), " reads slot ", slot,
                              " of ring ", r, " before ", describe(part), " lands in it");
        c.readers.push_back(k);
        if (st.kind == step_kind::exchange && st.what == payload::dout) c.parts.push_back(k);
      }
    }
    bool const spread_step = st.kind == step_kind::exchange || (st.kind == step_kind::sink && s.params.ranks > 1);
    std::int32_t const chunk = st.what == payload::dkv ? st.j : st.i;
    if (spread_step && (chunk < 0 || chunk >= s.params.chunks))
      return make_error(errc::internal, "schedule: ", describe(k), " names no chunk in [0, ",
                        s.params.chunks, ")");
    if (st.kind == step_kind::exchange)
      exchanged[static_cast<std::size_t>(st.what)][static_cast<std::size_t>(chunk)] = static_cast<std::int64_t>(k);
    if (spread_step && st.kind == step_kind::sink) {
      std::int64_t const e = exchanged[static_cast<std::size_t>(st.what)][static_cast<std::size_t>(chunk)];
      if (e < 0 || !before(static_cast<std::size_t>(e), k))
        return make_error(errc::internal, "schedule: ", describe(k),
                          " hands the caller a chunk before its exchange on P = ", s.params.ranks, " ranks");
    }
    if (st.kind == step_kind::offload && st.what == payload::kv)
      kv_host[static_cast<std::size_t>(st.j)] = static_cast<std::int64_t>(k);
    if (st.kind == step_kind::write_back && (st.what == payload::dq || st.what == payload::dq_dout))
      dq_host[static_cast<std::size_t>(st.i)] = static_cast<std::int64_t>(k);
    if (st.kind == step_kind::write_back && st.what == payload::dq_dout)
      dout_host[static_cast<std::size_t>(st.i)] = static_cast<std::int64_t>(k);
    if (st.kind == step_kind::fetch) {
      auto written = [&](std::int64_t w) { return w != -1 && (w < 0 || before(static_cast<std::size_t>(w), k)); };
      bool const ok = st.what == payload::kv && s.which == pass::forward ? written(kv_host[static_cast<std::size_t>(st.j)])
                      : st.what == payload::q_side_dq ? written(dq_host[static_cast<std::size_t>(st.i)]) &&
                                                            written(dout_host[static_cast<std::size_t>(st.i)])
                                                      : true;
      if (!ok)
        return make_error(errc::internal, "schedule: ", describe(k),
                          " fetches a host copy that was not written before it");
    }
  }
  return {};
}

//! The most slots of ring `r` that hold content at once, following the schedule in issue order
//! (a slot counts from its first load; releases do not empty it, the next load replaces it).
[[nodiscard]] inline index_t peak_slots(schedule const& s, ring r) {
  std::vector<bool> used(static_cast<std::size_t>(s.ring_size[static_cast<std::size_t>(r)]), false);
  index_t peak = 0, now = 0;
  for (schedule_step const& st : s.steps) {
    std::int32_t const slot = st.slot_of(r);
    if (slot < 0 || slot >= static_cast<std::int32_t>(used.size())) continue;
    if (!used[static_cast<std::size_t>(slot)]) {
      used[static_cast<std::size_t>(slot)] = true;
      peak = std::max(peak, ++now);
    }
  }
  return peak;
}

FPDT_NAMESPACE_END
