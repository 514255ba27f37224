// Tests of include/fpdt/core/dlpack.hpp: views over DLPack tensors as frameworks hand them over
// (row-major with NULL strides, transposed and sliced strides, byte offsets, pinned and device
// memory), and every mismatch refused naming the values.
#include <fpdt/core/dlpack.hpp>

#include <doctest/doctest.h>

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace {
bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

// A DLTensor over `data` as a framework would describe it.
struct tensor {
  std::vector<std::int64_t> shape, strides;
  DLTensor t{};
  tensor(void* data, DLDataType dt, std::vector<std::int64_t> shp, std::vector<std::int64_t> str = {},
         DLDeviceType dev = kDLCPU, std::uint64_t offset = 0)
      : shape(std::move(shp)), strides(std::move(str)) {
    t.data = data;
    t.device = {dev, 0};
    t.ndim = static_cast<int>(shape.size());
    t.dtype = dt;
    t.shape = shape.data();
    t.strides = strides.empty() ? nullptr : strides.data();
    t.byte_offset = offset;
  }
};
} // namespace

TEST_CASE("dlpack: a row-major tensor with NULL strides is viewed element for element") {
  std::vector<float> x(2 * 3 * 4);
  std::iota(x.begin(), x.end(), 0.0f);
  tensor t(x.data(), fpdt::dlpack_dtype<float>(), {2, 3, 4});
  auto v = fpdt::from_dlpack<float const, 3>(t.t);
  REQUIRE(v.ok());
  CHECK(v->extent(0) == 2);
  CHECK(v->extent(2) == 4);
  CHECK((*v)(1, 2, 3) == 23.0f);
  CHECK(v->stride(0) == 12);
  // The managed form (PyTorch's legacy capsule) gives the same view.
  DLManagedTensor m{};
  m.dl_tensor = t.t;
  CHECK(fpdt::from_dlpack<float const, 3>(m)->data() == v->data());
}

TEST_CASE("dlpack: strides and byte offsets as a sliced, transposed framework tensor has them") {
  // x.T[1:] of a [4, 3] row-major int64 tensor: shape [2, 4], strides [1, 3], offset 1 element.
  std::vector<std::int64_t> x(12);
  std::iota(x.begin(), x.end(), 0);
  tensor t(x.data(), fpdt::dlpack_dtype<std::int64_t>(), {2, 4}, {1, 3}, kDLCPU, sizeof(std::int64_t));
  auto v = fpdt::from_dlpack<std::int64_t, 2>(t.t);
  REQUIRE(v.ok());
  for (fpdt::index_t i = 0; i < 2; ++i)
    for (fpdt::index_t j = 0; j < 4; ++j) CHECK((*v)(i, j) == j * 3 + i + 1);
}

TEST_CASE("dlpack: 16-bit types are read as torch and CUDA store them") {
  // torch.tensor([1.0, -2.0], dtype=torch.bfloat16) / torch.float16 hold these bit patterns.
  std::uint16_t bf[2] = {0x3F80, 0xC000}, hf[2] = {0x3C00, 0xC000};
  tensor b(bf, DLDataType{kDLBfloat, 16, 1}, {2});
  tensor h(hf, DLDataType{kDLFloat, 16, 1}, {2});
  auto vb = fpdt::from_dlpack<fpdt::bfloat16 const, 1>(b.t);
  auto vh = fpdt::from_dlpack<fpdt::half const, 1>(h.t);
  REQUIRE(vb.ok());
  REQUIRE(vh.ok());
  CHECK(static_cast<float>((*vb)(0)) == 1.0f);
  CHECK(static_cast<float>((*vb)(1)) == -2.0f);
  CHECK(static_cast<float>((*vh)(0)) == 1.0f);
  CHECK(static_cast<float>((*vh)(1)) == -2.0f);
  // bf16 and f16 are not confused with each other.
  CHECK(contains(fpdt::from_dlpack<fpdt::half const, 1>(b.t).error().message(), "dtype is bfloat16"));
}

TEST_CASE("dlpack: memory where it was asked for: pinned host and managed memory are host views, kDLCUDA only a device view") {
  float x[4] = {};
  for (DLDeviceType dev : {kDLCPU, kDLCUDAHost, kDLCUDAManaged}) {
    tensor t(x, fpdt::dlpack_dtype<float>(), {4}, {}, dev);
    CHECK(fpdt::from_dlpack<float, 1>(t.t, fpdt::dlpack_memory::host).ok());
  }
  tensor gpu(x, fpdt::dlpack_dtype<float>(), {4}, {}, kDLCUDA);
  CHECK(fpdt::from_dlpack<float, 1>(gpu.t, fpdt::dlpack_memory::device).ok());
  auto e = fpdt::from_dlpack<float, 1>(gpu.t).error();
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(contains(e.message(), "lives on kDLCUDA (device_type 2, id 0), but a host view was asked for"));
  tensor cpu(x, fpdt::dlpack_dtype<float>(), {4});
  CHECK(contains(fpdt::from_dlpack<float, 1>(cpu.t, fpdt::dlpack_memory::device).error().message(),
                 "lives on kDLCPU"));
}

TEST_CASE("dlpack: wrong rank, dtype, lanes, offset, broadcast and overlapping strides are refused naming the values") {
  float x[24] = {};
  tensor t(x, fpdt::dlpack_dtype<float>(), {2, 3, 4});
  CHECK(contains(fpdt::from_dlpack<float, 2>(t.t).error().message(), "has 3 dimensions, expected 2"));
  CHECK(contains(fpdt::from_dlpack<double, 3>(t.t).error().message(),
                 "dtype is float32 (code 2, bits 32, lanes 1), expected float64"));
  tensor vec(x, DLDataType{kDLFloat, 32, 4}, {6});
  CHECK(contains(fpdt::from_dlpack<float, 1>(vec.t).error().message(), "float32x4"));
  tensor off(x, fpdt::dlpack_dtype<float>(), {4}, {}, kDLCPU, 2);
  CHECK(contains(fpdt::from_dlpack<float, 1>(off.t).error().message(), "byte_offset 2 is not a multiple of the element size 4"));
  // x.expand(3, 4) of a [4] tensor: stride 0 on a dimension of extent 3.
  tensor bcast(x, fpdt::dlpack_dtype<float>(), {3, 4}, {0, 1});
  auto e = fpdt::from_dlpack<float, 2>(bcast.t).error();
  CHECK(e.code() == fpdt::errc::shape_mismatch);
  CHECK(contains(e.message(), "from_dlpack: tensor view with extents"));
  CHECK(contains(e.message(), "stride 0 of dim 0"));
  tensor overlap(x, fpdt::dlpack_dtype<float>(), {3, 4}, {2, 1});
  CHECK(contains(fpdt::from_dlpack<float, 2>(overlap.t).error().message(), "overlaps dim"));
  // An empty tensor may have a null data pointer.
  tensor empty(nullptr, fpdt::dlpack_dtype<float>(), {0, 4});
  CHECK(fpdt::from_dlpack<float, 2>(empty.t).ok());
  tensor null(nullptr, fpdt::dlpack_dtype<float>(), {2, 4});
  CHECK(contains(fpdt::from_dlpack<float, 2>(null.t).error().message(), "null data pointer"));
}
