# Install and export: find_package(fpdt CONFIG REQUIRED COMPONENTS cuda mpi nccl blas dlpack) works from the
# install tree. Each component has its own export set so that the core never requires CUDA or MPI.
include(CMakePackageConfigHelpers)
set(FPDT_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/fpdt" CACHE STRING "Where fpdtConfig.cmake goes")

install(TARGETS fpdt EXPORT fpdtTargets FILE_SET HEADERS DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(EXPORT fpdtTargets NAMESPACE fpdt:: DESTINATION "${FPDT_INSTALL_CMAKEDIR}")
set(FPDT_INSTALLED_COMPONENTS)
foreach(comp IN ITEMS cuda mpi nccl blas dlpack)
  if(TARGET fpdt_${comp})
    install(TARGETS fpdt_${comp} EXPORT fpdt_${comp}Targets FILE_SET HEADERS DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
    install(EXPORT fpdt_${comp}Targets NAMESPACE fpdt:: DESTINATION "${FPDT_INSTALL_CMAKEDIR}")
    list(APPEND FPDT_INSTALLED_COMPONENTS ${comp})
  endif()
endforeach()

configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/fpdtConfig.cmake.in" "${CMAKE_CURRENT_BINARY_DIR}/fpdtConfig.cmake"
  INSTALL_DESTINATION "${FPDT_INSTALL_CMAKEDIR}")
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/fpdtConfigVersion.cmake"
                                 COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/fpdtConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/fpdtConfigVersion.cmake"
              "${CMAKE_CURRENT_LIST_DIR}/FindNCCL.cmake"
        DESTINATION "${FPDT_INSTALL_CMAKEDIR}")
