# fpdt_add_header_checks(<name> <target> <language> <headers...>): one generated translation unit
# per header, each including only that header, compiled as an object library linked to <target>.
# Proves that every public header compiles on its own (includes what it uses).
function(fpdt_add_header_checks name target language)
  set(sources)
  foreach(h IN LISTS ARGN)
    file(RELATIVE_PATH rel "${FPDT_INCLUDE_DIR}" "${h}")
    string(MAKE_C_IDENTIFIER "${rel}" id)
    if(language STREQUAL "CUDA")
      set(src "${CMAKE_CURRENT_BINARY_DIR}/header_checks/${id}.cu")
    else()
      set(src "${CMAKE_CURRENT_BINARY_DIR}/header_checks/${id}.cpp")
    endif()
    file(CONFIGURE OUTPUT "${src}" CONTENT "#include <${rel}>\n#include <${rel}> // twice: include guards\n")
    list(APPEND sources "${src}")
  endforeach()
  if(sources)
    add_library(${name} OBJECT ${sources})
    target_link_libraries(${name} PRIVATE ${target} fpdt_warnings)
  endif()
endfunction()

# fpdt_add_mpi_test(<name> <target> <nranks>): runs <target> as <nranks> MPI processes. Oversubscribed
# (CI has 2 cores); allowed as root (CI runs as root); shared-memory single-copy off, since
# containers usually forbid the ptrace-based CMA it uses. Leak checking is off for these processes
# under ASan: OpenMPI keeps allocations past MPI_Finalize that LeakSanitizer reports as leaks (the
# host tests keep leak checking on for fpdt's own code).
function(fpdt_add_mpi_test name target nranks)
  add_test(NAME ${name}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${nranks} --oversubscribe
                   ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${target}> ${MPIEXEC_POSTFLAGS})
  set_tests_properties(${name} PROPERTIES
    LABELS mpi TIMEOUT 120 PROCESSORS 2
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_btl_vader_single_copy_mechanism=none;OMPI_MCA_rmaps_base_oversubscribe=1;ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
endfunction()
