// Consumer of fpdt::dlpack: a view of a DLPack tensor as a framework would hand it over.
#include <fpdt/core/dlpack.hpp>

#include <cstdint>
#include <cstdio>

int main() {
  float x[6] = {0, 1, 2, 3, 4, 5};
  std::int64_t shape[2] = {2, 3};
  DLTensor t{};
  t.data = x;
  t.device = {kDLCPU, 0};
  t.ndim = 2;
  t.dtype = fpdt::dlpack_dtype<float>();
  t.shape = shape;
  auto v = fpdt::from_dlpack<float const, 2>(t);
  if (!v.ok() || (*v)(1, 2) != 5.0f) return 1;
  std::printf("consumer_dlpack ok\n");
  return 0;
}
