# Runs the consumer project (cmake -P). Variables: FPDT_SOURCE_DIR, FPDT_BINARY_DIR (install mode),
# WORK_DIR, MODE (install | subdirectory), CONFIG, CXX_COMPILER, HAVE_CUDA, HAVE_MPI, HAVE_NCCL,
# HAVE_DLPACK.
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${WORK_DIR}")
set(consumer_src "${CMAKE_CURRENT_LIST_DIR}")
set(build "${WORK_DIR}/build")
if(NOT CONFIG)
  set(CONFIG RelWithDebInfo)
endif()
set(args -S "${consumer_src}" -B "${build}" -D CMAKE_BUILD_TYPE=${CONFIG} -D CMAKE_CXX_COMPILER=${CXX_COMPILER})

if(MODE STREQUAL "install")
  set(prefix "${WORK_DIR}/prefix")
  execute_process(COMMAND "${CMAKE_COMMAND}" --install "${FPDT_BINARY_DIR}" --prefix "${prefix}" --config ${CONFIG}
                  COMMAND_ERROR_IS_FATAL ANY)
  set(components)
  foreach(c IN ITEMS CUDA MPI NCCL DLPACK)
    if(HAVE_${c})
      string(TOLOWER ${c} lc)
      list(APPEND components ${lc})
    endif()
  endforeach()
  string(REPLACE ";" "\\;" components_arg "${components}")
  # Only the install tree may be found: not the source or build tree of fpdt.
  list(APPEND args -D FPDT_CONSUMER_MODE=install -D "FPDT_CONSUMER_COMPONENTS=${components_arg}"
                   -D CMAKE_PREFIX_PATH=${prefix} -D CMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
  message(STATUS "consumer: find_package(fpdt COMPONENTS ${components}) from ${prefix}")
else()
  list(APPEND args -D FPDT_CONSUMER_MODE=subdirectory -D FPDT_SOURCE_DIR=${FPDT_SOURCE_DIR})
endif()

execute_process(COMMAND "${CMAKE_COMMAND}" ${args} COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${build}" --parallel 2 COMMAND_ERROR_IS_FATAL ANY)
foreach(exe IN ITEMS consumer consumer_mpi consumer_cuda consumer_nccl consumer_dlpack)
  if(EXISTS "${build}/${exe}")
    execute_process(COMMAND "${build}/${exe}" COMMAND_ERROR_IS_FATAL ANY)
  endif()
endforeach()
if(NOT EXISTS "${build}/consumer")
  message(FATAL_ERROR "the consumer executable was not built")
endif()
