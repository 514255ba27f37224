# The fpdt::* INTERFACE targets. Headers are split by what they need:
#   include/fpdt/**/*.hpp outside cuda/, mpi/, nccl/ folders  -> fpdt::fpdt (host-safe)
#   include/fpdt/**/cuda/*.hpp and every *.cuh                -> fpdt::cuda
#   include/fpdt/**/mpi/*.hpp                                 -> fpdt::mpi
#   include/fpdt/**/nccl/*.hpp                                -> fpdt::nccl
#   include/fpdt/**/cblas_*.hpp                               -> fpdt::blas
#   include/fpdt/**/dlpack*.hpp                               -> fpdt::dlpack
set(FPDT_INCLUDE_DIR "${CMAKE_CURRENT_LIST_DIR}/../include")
cmake_path(NORMAL_PATH FPDT_INCLUDE_DIR)

file(GLOB_RECURSE _fpdt_all_headers CONFIGURE_DEPENDS
     "${FPDT_INCLUDE_DIR}/fpdt/*.hpp" "${FPDT_INCLUDE_DIR}/fpdt/*.cuh")
set(FPDT_HOST_HEADERS)
set(FPDT_CUDA_HEADERS)
set(FPDT_MPI_HEADERS)
set(FPDT_NCCL_HEADERS)
set(FPDT_BLAS_HEADERS)
set(FPDT_DLPACK_HEADERS)
foreach(h IN LISTS _fpdt_all_headers)
  if(h MATCHES "/cblas_[^/]*\\.hpp$")
    list(APPEND FPDT_BLAS_HEADERS "${h}")
  elseif(h MATCHES "/dlpack[^/]*\\.hpp$")
    list(APPEND FPDT_DLPACK_HEADERS "${h}")
  elseif(h MATCHES "/nccl/")
    list(APPEND FPDT_NCCL_HEADERS "${h}")
  elseif(h MATCHES "/mpi/")
    list(APPEND FPDT_MPI_HEADERS "${h}")
  elseif(h MATCHES "/cuda/" OR h MATCHES "\\.cuh$")
    list(APPEND FPDT_CUDA_HEADERS "${h}")
  else()
    list(APPEND FPDT_HOST_HEADERS "${h}")
  endif()
endforeach()

add_library(fpdt INTERFACE)
add_library(fpdt::fpdt ALIAS fpdt)
target_compile_features(fpdt INTERFACE cxx_std_20)
target_link_libraries(fpdt INTERFACE Threads::Threads)  # host streams are std::threads
target_sources(fpdt INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_HOST_HEADERS})

if(FPDT_HAVE_CUDA)
  add_library(fpdt_cuda INTERFACE)
  add_library(fpdt::cuda ALIAS fpdt_cuda)
  set_target_properties(fpdt_cuda PROPERTIES EXPORT_NAME cuda)
  # C++20 for nvcc as a flag: CMake 3.25 knows no cuda_std_20 feature for nvcc (added in 3.26?).
  target_compile_options(fpdt_cuda INTERFACE "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
  target_link_libraries(fpdt_cuda INTERFACE fpdt CUDA::cudart)
  target_sources(fpdt_cuda INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_CUDA_HEADERS})
endif()

if(FPDT_HAVE_MPI)
  add_library(fpdt_mpi INTERFACE)
  add_library(fpdt::mpi ALIAS fpdt_mpi)
  set_target_properties(fpdt_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(fpdt_mpi INTERFACE fpdt MPI::MPI_CXX)
  target_sources(fpdt_mpi INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_MPI_HEADERS})
endif()

if(FPDT_HAVE_NCCL)
  add_library(fpdt_nccl INTERFACE)
  add_library(fpdt::nccl ALIAS fpdt_nccl)
  set_target_properties(fpdt_nccl PROPERTIES EXPORT_NAME nccl)
  target_link_libraries(fpdt_nccl INTERFACE fpdt_cuda NCCL::NCCL)
  target_sources(fpdt_nccl INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_NCCL_HEADERS})
endif()

if(FPDT_HAVE_BLAS)
  add_library(fpdt_blas INTERFACE)
  add_library(fpdt::blas ALIAS fpdt_blas)
  set_target_properties(fpdt_blas PROPERTIES EXPORT_NAME blas)
  target_link_libraries(fpdt_blas INTERFACE fpdt BLAS::BLAS)
  target_include_directories(fpdt_blas SYSTEM INTERFACE "${FPDT_CBLAS_INCLUDE_DIR}")
  target_compile_definitions(fpdt_blas INTERFACE FPDT_HAVE_CBLAS=1)
  target_sources(fpdt_blas INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_BLAS_HEADERS})
endif()

if(FPDT_HAVE_DLPACK)
  add_library(fpdt_dlpack INTERFACE)
  add_library(fpdt::dlpack ALIAS fpdt_dlpack)
  set_target_properties(fpdt_dlpack PROPERTIES EXPORT_NAME dlpack)
  target_link_libraries(fpdt_dlpack INTERFACE fpdt dlpack::dlpack)
  target_sources(fpdt_dlpack INTERFACE FILE_SET HEADERS BASE_DIRS "${FPDT_INCLUDE_DIR}" FILES ${FPDT_DLPACK_HEADERS})
endif()
