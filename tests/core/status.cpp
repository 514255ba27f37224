// Tests of include/fpdt/core/status.hpp.
#include <fpdt/core/status.hpp>

#include <doctest/doctest.h>

#include <memory>
#include <string>

namespace {
fpdt::status check_divisible(long s, long p) {
  if (p <= 0 || s % p != 0)
    return fpdt::make_error(fpdt::errc::invalid_argument, "sequence length ", s,
                            " is not divisible by world size ", p);
  return {};
}
fpdt::result<long> local_length(long s, long p) {
  FPDT_TRY(check_divisible(s, p));
  return s / p;
}
fpdt::status twice(long s, long p, long& out) {
  auto r = local_length(s, p);
  FPDT_TRY(r);
  out = *r * 2;
  return fpdt::ok_status();
}
} // namespace

TEST_CASE("status: ok and error values") {
  fpdt::status ok;
  CHECK(ok.ok());
  CHECK(static_cast<bool>(ok));
  CHECK(ok.code() == fpdt::errc::ok);
  CHECK(ok.to_string() == "ok");
  fpdt::status e = check_divisible(7, 2);
  CHECK_FALSE(e.ok());
  CHECK(e.code() == fpdt::errc::invalid_argument);
  CHECK(e.message() == "sequence length 7 is not divisible by world size 2");
  CHECK(e.to_string() == "invalid_argument: sequence length 7 is not divisible by world size 2");
  CHECK(e.with_context("layer 3").message() ==
        "layer 3: sequence length 7 is not divisible by world size 2");
  CHECK(ok.with_context("layer 3").ok());
  CHECK(fpdt::status(fpdt::errc::ok, "ignored").message().empty());
  CHECK(fpdt::to_string(fpdt::errc::out_of_memory) == "out_of_memory");
}

TEST_CASE("status: result and FPDT_TRY propagate the first error") {
  auto r = local_length(8, 2);
  REQUIRE(r.ok());
  CHECK(*r == 4);
  CHECK(r.error().ok());
  auto bad = local_length(7, 2);
  CHECK_FALSE(bad.ok());
  CHECK(bad.error().message().find("7") != std::string::npos);
  long out = -1;
  CHECK(twice(8, 2, out).ok());
  CHECK(out == 8);
  out = -1;
  fpdt::status s = twice(2, 3, out);
  CHECK(s.code() == fpdt::errc::invalid_argument);
  CHECK(out == -1); // nothing written on error
  // A result built from an ok status has no value: it reports an internal error, never "ok".
  fpdt::result<int> nothing{fpdt::status{}};
  CHECK_FALSE(nothing.ok());
  CHECK(nothing.error().code() == fpdt::errc::internal);
  // value() on an error throws with the error's message instead of a bare variant error.
  try {
    (void)bad.value();
    FAIL("value() on an error must throw");
  } catch (fpdt::bad_result_access const& ex) {
    CHECK(std::string(ex.what()).find("sequence length 7") != std::string::npos);
    CHECK(ex.error().code() == fpdt::errc::invalid_argument);
  }
  // Move-only values.
  fpdt::result<std::unique_ptr<int>> p{std::make_unique<int>(5)};
  REQUIRE(p.ok());
  std::unique_ptr<int> taken = std::move(p).value();
  CHECK(*taken == 5);
  fpdt::result<std::unique_ptr<int>> p2{std::make_unique<int>(6)};
  std::unique_ptr<int> taken2;
  taken2 = *std::move(p2); // move assignment from the result's value
  CHECK(*taken2 == 6);
}
