// GPU tests of include/fpdt/comm/nccl/nccl_communicator.hpp on a one-rank NCCL world
// (ncclCommInitAll over device 0): every collective is then an exact copy, which the tests check
// bit for bit against buffers pre-filled with a sentinel, for f32, bf16, f16 and f64. Argument
// errors are checked for their code, for messages that name the values, and for enqueuing nothing.
#include <fpdt/comm/nccl/nccl_communicator.hpp>

#include <fpdt/core/bfloat16.hpp>
#include <fpdt/core/dtype.hpp>
#include <fpdt/core/half.hpp>

#include <doctest/doctest.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr unsigned char sentinel_byte = 0xA5;

// A one-rank NCCL world on device 0 and a non-blocking stream (the comm lane). The caller's side:
// fpdt never creates or destroys the comm.
struct world {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  world() {
    int const devices[1] = {0};
    REQUIRE(cudaSetDevice(0) == cudaSuccess);
    REQUIRE(ncclCommInitAll(&comm, 1, devices) == ncclSuccess);
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  }
  world(world const&) = delete;
  world& operator=(world const&) = delete;
  ~world() {
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
    if (comm != nullptr) (void)ncclCommDestroy(comm);
  }
  void sync() const { REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess); }
};

// `n` elements of T in device memory; copies are ordered on the world's stream.
template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_buffer(std::size_t count) : n(count) {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess);
    ptr = static_cast<T*>(p);
  }
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  ~device_buffer() { (void)cudaFree(ptr); }

  void upload(std::vector<T> const& host, cudaStream_t s) {
    REQUIRE(host.size() == n);
    REQUIRE(cudaMemcpyAsync(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice, s) ==
            cudaSuccess);
    REQUIRE(cudaStreamSynchronize(s) == cudaSuccess); // `host` may go away after the return
  }
  void fill_sentinel(cudaStream_t s) {
    REQUIRE(cudaMemsetAsync(ptr, sentinel_byte, n * sizeof(T), s) == cudaSuccess);
  }
  [[nodiscard]] std::vector<T> download(cudaStream_t s) const {
    std::vector<T> host(n);
    REQUIRE(cudaMemcpyAsync(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost, s) ==
            cudaSuccess);
    REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
    return host;
  }
};

// Non-zero values exact in every dtype under test (multiples of 1/4 up to 15.25).
template <class T>
std::vector<T> pattern(std::size_t n) {
  std::vector<T> v;
  v.reserve(n);
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(T(static_cast<float>(i % 61 + 1) * 0.25f));
  return v;
}

// `n` elements whose bytes are all the sentinel.
template <class T>
std::vector<T> sentinels(std::size_t n) {
  std::vector<T> v(n);
  std::memset(static_cast<void*>(v.data()), sentinel_byte, n * sizeof(T));
  return v;
}

template <class T>
bool same_bits(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

bool mentions(fpdt::status const& s, std::string const& part) {
  return s.message().find(part) != std::string::npos;
}

} // namespace

TEST_CASE("nccl_communicator: create reads rank, size and device of the caller's comm") {
  world w;
  fpdt::result<fpdt::nccl_communicator> c = fpdt::nccl_communicator::create(w.comm);
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  CHECK(c->valid());
  CHECK(c->rank() == 0);
  CHECK(c->size() == 1);
  CHECK(c->device() == 0);
  CHECK(c->native_handle() == w.comm);
  MESSAGE("all_to_all uses ", fpdt::nccl_communicator::native_all_to_all
                                  ? "ncclAlltoAll"
                                  : "grouped ncclSend/ncclRecv");

  // Moving hands over the comm handle; the moved-from object refuses work, and destroying both
  // leaves the caller's comm usable.
  fpdt::nccl_communicator moved = std::move(*c);
  CHECK(moved.valid());
  CHECK_FALSE(c->valid());
  fpdt::status const gone = c->barrier(w.stream);
  CHECK(gone.code() == fpdt::errc::invalid_argument);
  CHECK(mentions(gone, "moved from"));
  CHECK(moved.barrier(w.stream).ok());
  w.sync();

  fpdt::result<fpdt::nccl_communicator> none = fpdt::nccl_communicator::create(nullptr);
  REQUIRE_FALSE(none.ok());
  CHECK(none.error().code() == fpdt::errc::invalid_argument);
  CHECK(mentions(none.error(), "ncclComm_t is null"));
}

TEST_CASE("nccl_communicator: to_nccl maps every fpdt dtype") {
  CHECK(*fpdt::to_nccl(fpdt::dtype::f32) == ncclFloat32);
  CHECK(*fpdt::to_nccl(fpdt::dtype::f16) == ncclFloat16);
  CHECK(*fpdt::to_nccl(fpdt::dtype::bf16) == ncclBfloat16);
  CHECK(*fpdt::to_nccl(fpdt::dtype::f64) == ncclFloat64);
  fpdt::result<ncclDataType_t> const bad = fpdt::to_nccl(static_cast<fpdt::dtype>(200));
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code() == fpdt::errc::invalid_argument);
  CHECK(mentions(bad.error(), "dtype value 200"));
}

TEST_CASE_TEMPLATE("nccl_communicator: with one rank every collective is an exact copy", T, float,
                   fpdt::bfloat16, fpdt::half, double) {
  constexpr fpdt::dtype type = fpdt::dtype_of<T>;
  CAPTURE(fpdt::to_string(type));
  world w;
  fpdt::result<fpdt::nccl_communicator> made = fpdt::nccl_communicator::create(w.comm);
  REQUIRE_MESSAGE(made.ok(), made.error().to_string());
  fpdt::nccl_communicator& c = *made;

  constexpr std::size_t n = 1000;
  std::vector<T> const data = pattern<T>(n);
  device_buffer<T> send(n);
  send.upload(data, w.stream);
  device_buffer<T> recv(n);

  SUBCASE("all_to_all") {
    recv.fill_sentinel(w.stream);
    fpdt::status const s = c.all_to_all(send.ptr, recv.ptr, n, type, w.stream);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    CHECK(same_bits(recv.download(w.stream), data));
  }

  SUBCASE("all_to_all_v with displacements") {
    // 990 elements from send offset 3 to recv offset 5; the rest of recv keeps its sentinel.
    std::size_t const count = n - 10;
    std::size_t const counts[1] = {count};
    std::size_t const send_displs[1] = {3};
    std::size_t const recv_displs[1] = {5};
    recv.fill_sentinel(w.stream);
    fpdt::status const s = c.all_to_all_v(send.ptr, counts, send_displs, recv.ptr, counts,
                                          recv_displs, type, w.stream);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    std::vector<T> expected = sentinels<T>(n);
    for (std::size_t i = 0; i < count; ++i)
      expected[5 + i] = data[3 + i];
    CHECK(same_bits(recv.download(w.stream), expected));
  }

  SUBCASE("all_reduce_sum, out of place and in place") {
    recv.fill_sentinel(w.stream);
    fpdt::status s = c.all_reduce_sum(send.ptr, recv.ptr, n, type, w.stream);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    CHECK(same_bits(recv.download(w.stream), data));
    s = c.all_reduce_sum(recv.ptr, recv.ptr, n, type, w.stream);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    CHECK(same_bits(recv.download(w.stream), data));
  }

  SUBCASE("all_gather, out of place and in place") {
    recv.fill_sentinel(w.stream);
    fpdt::status s = c.all_gather(send.ptr, recv.ptr, n, type, w.stream);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    CHECK(same_bits(recv.download(w.stream), data));
    s = c.all_gather(recv.ptr, recv.ptr, n, type, w.stream); // send == recv + rank * n
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    CHECK(same_bits(recv.download(w.stream), data));
  }

  SUBCASE("zero counts enqueue nothing") {
    recv.fill_sentinel(w.stream);
    std::size_t const zero[1] = {0};
    CHECK(c.all_to_all(send.ptr, recv.ptr, 0, type, w.stream).ok());
    CHECK(c.all_to_all_v(nullptr, zero, zero, nullptr, zero, zero, type, w.stream).ok());
    CHECK(c.all_reduce_sum(send.ptr, recv.ptr, 0, type, w.stream).ok());
    CHECK(c.all_gather(send.ptr, recv.ptr, 0, type, w.stream).ok());
    CHECK(same_bits(recv.download(w.stream), sentinels<T>(n)));
  }

  // The stream-ordered barrier completes, and nothing above left an asynchronous error.
  fpdt::status const b = c.barrier(w.stream);
  REQUIRE_MESSAGE(b.ok(), b.to_string());
  w.sync();
  fpdt::status const async = c.async_error();
  CHECK_MESSAGE(async.ok(), async.to_string());
}

TEST_CASE("nccl_communicator: argument errors name the values and enqueue nothing") {
  world w;
  fpdt::result<fpdt::nccl_communicator> made = fpdt::nccl_communicator::create(w.comm);
  REQUIRE_MESSAGE(made.ok(), made.error().to_string());
  fpdt::nccl_communicator& c = *made;
  constexpr fpdt::dtype f32 = fpdt::dtype::f32;
  auto const bad_type = static_cast<fpdt::dtype>(200);

  constexpr std::size_t n = 64;
  device_buffer<float> send(n);
  send.upload(pattern<float>(n), w.stream);
  device_buffer<float> recv(n);
  recv.fill_sentinel(w.stream);

  auto const expect = [](fpdt::status const& s, fpdt::errc code,
                         std::vector<std::string> const& parts) {
    CHECK_MESSAGE(s.code() == code, s.to_string());
    for (std::string const& part : parts)
      CHECK_MESSAGE(mentions(s, part), s.to_string());
  };
  auto const inv = fpdt::errc::invalid_argument;

  SUBCASE("null pointers") {
    expect(c.all_to_all(nullptr, recv.ptr, n, f32, w.stream), inv,
           {"nccl_communicator::all_to_all", "64 f32", "send pointer is null"});
    expect(c.all_to_all(send.ptr, nullptr, n, f32, w.stream), inv, {"recv pointer is null"});
    expect(c.all_reduce_sum(nullptr, recv.ptr, n, f32, w.stream), inv,
           {"nccl_communicator::all_reduce_sum", "64 f32", "send pointer is null"});
    expect(c.all_gather(send.ptr, nullptr, n, f32, w.stream), inv,
           {"nccl_communicator::all_gather", "recv pointer is null"});
    std::size_t const counts[1] = {n};
    std::size_t const displs[1] = {0};
    expect(c.all_to_all_v(send.ptr, counts, displs, nullptr, counts, displs, f32, w.stream), inv,
           {"nccl_communicator::all_to_all_v", "recv pointer is null but recv_counts[0] = 64"});
  }

  SUBCASE("count mismatches") {
    std::size_t const two[2] = {n / 2, n / 2};
    std::size_t const two_displs[2] = {0, n / 2};
    std::size_t const one[1] = {n};
    std::size_t const zero_displ[1] = {0};
    expect(c.all_to_all_v(send.ptr, two, two_displs, recv.ptr, one, zero_displ, f32, w.stream), inv,
           {"send_counts has 2 entries but the communicator has 1 ranks"});
    expect(c.all_to_all_v(send.ptr, one, zero_displ, recv.ptr, one, two_displs, f32, w.stream), inv,
           {"recv_displs has 2 entries"});
    std::size_t const four[1] = {4};
    std::size_t const five[1] = {5};
    expect(c.all_to_all_v(send.ptr, four, zero_displ, recv.ptr, five, zero_displ, f32, w.stream),
           inv, {"send_counts[0] = 4 differs from recv_counts[0] = 5"});
    std::size_t const huge[1] = {std::numeric_limits<std::size_t>::max() - 1};
    expect(c.all_to_all_v(send.ptr, four, huge, recv.ptr, four, zero_displ, f32, w.stream), inv,
           {"send_displs[0] = ", "overflows"});
    expect(c.all_to_all(send.ptr, recv.ptr, std::numeric_limits<std::size_t>::max() / 2, f32,
                        w.stream),
           inv, {"overflows"});
  }

  SUBCASE("overlapping buffers") {
    expect(c.all_to_all(send.ptr, send.ptr + 1, n / 2, f32, w.stream), inv, {"overlap"});
    expect(c.all_reduce_sum(send.ptr, send.ptr + 1, n / 2, f32, w.stream), inv,
           {"overlap without being equal"});
    expect(c.all_gather(send.ptr + 1, send.ptr, n / 2, f32, w.stream), inv, {"rank-0 block"});
    std::size_t const counts[1] = {n / 2};
    std::size_t const send_displs[1] = {0};
    std::size_t const recv_displs[1] = {n / 4};
    expect(
        c.all_to_all_v(send.ptr, counts, send_displs, send.ptr, counts, recv_displs, f32, w.stream),
        inv, {"send elements [0, 32)", "recv elements [16, 48)", "overlap"});
  }

  SUBCASE("dtype outside the enum") {
    std::size_t const counts[1] = {n};
    std::size_t const displs[1] = {0};
    expect(c.all_to_all(send.ptr, recv.ptr, n, bad_type, w.stream), inv,
           {"nccl_communicator::all_to_all", "dtype value 200"});
    expect(c.all_to_all_v(send.ptr, counts, displs, recv.ptr, counts, displs, bad_type, w.stream),
           inv, {"nccl_communicator::all_to_all_v", "dtype value 200"});
    expect(c.all_reduce_sum(send.ptr, recv.ptr, n, bad_type, w.stream), inv,
           {"nccl_communicator::all_reduce_sum", "dtype value 200"});
    expect(c.all_gather(send.ptr, recv.ptr, n, bad_type, w.stream), inv,
           {"nccl_communicator::all_gather", "dtype value 200"});
  }

  // Every call above was refused before reaching NCCL: recv still holds its sentinel.
  CHECK(same_bits(recv.download(w.stream), sentinels<float>(n)));
  CHECK(c.async_error().ok());
}
