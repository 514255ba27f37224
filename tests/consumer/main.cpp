// Consumer of fpdt::fpdt: one include, a backend, a stream, a copy, a checked view.
#include <fpdt/fpdt.hpp>

#include <array>
#include <cstdio>
#include <vector>

int main() {
  fpdt::host_backend be({.device_budget_bytes = 1 << 20});
  auto s = be.create_stream(fpdt::lane::compute);
  auto dev = be.device_memory().allocate(16 * sizeof(float), "consumer buffer");
  if (!s.ok() || !dev.ok()) return 1;
  std::vector<float> src(16, 2.5f);
  if (!be.copy_async(dev->data(), src.data(), 16 * sizeof(float), *s).ok()) return 1;
  if (!be.synchronize(*s).ok()) return 1;
  auto v = fpdt::contiguous_view(dev->as<float>(), std::array<fpdt::index_t, 2>{4, 4});
  if (!v.ok() || (*v)(3, 3) != 2.5f) return 1;
  std::printf("consumer ok: fpdt %d.%d.%d, peak device bytes %zu\n", fpdt::version.major,
              fpdt::version.minor, fpdt::version.patch, be.device_memory().peak_bytes());
  return 0;
}
