# fpdt_warnings: warning flags for fpdt's own tests, examples and benchmarks (never exported, so
# embedders keep their own flags).
add_library(fpdt_warnings INTERFACE)
set(_fpdt_cxx_warnings -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wold-style-cast
                       -Wcast-align -Woverloaded-virtual -Wnull-dereference)
if(FPDT_WARNINGS_AS_ERRORS)
  list(APPEND _fpdt_cxx_warnings -Werror)
endif()
target_compile_options(fpdt_warnings INTERFACE "$<$<COMPILE_LANGUAGE:CXX>:${_fpdt_cxx_warnings}>")
if(FPDT_HAVE_CUDA)
  # nvcc: its own warnings as errors, host-compiler warnings through -Xcompiler.
  set(_fpdt_cuda_warnings -Xcompiler=-Wall,-Wextra)
  if(FPDT_WARNINGS_AS_ERRORS)
    list(APPEND _fpdt_cuda_warnings -Werror=all-warnings)
  endif()
  target_compile_options(fpdt_warnings INTERFACE "$<$<COMPILE_LANGUAGE:CUDA>:${_fpdt_cuda_warnings}>")
endif()
