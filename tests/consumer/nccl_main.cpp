// Consumer of fpdt::nccl: NCCL's header and library come with the target.
#include <fpdt/comm/nccl/nccl_check.hpp>

#include <cstdio>

namespace {
fpdt::status nccl_version(int& v) {
  FPDT_NCCL_CHECK(ncclGetVersion(&v));
  return {};
}
} // namespace

int main() {
  int v = 0;
  fpdt::status s = nccl_version(v);
  std::printf("consumer_nccl ok: NCCL %d (%s)\n", v, s.to_string().c_str());
  return s.ok() ? 0 : 1;
}
