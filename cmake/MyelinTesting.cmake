# myelin_add_gtest(NAME <name> SOURCES ... DEPS ... LABELS ... [TIMEOUT s])
# Builds a GoogleTest binary and registers each test case with CTest, carrying the labels:
#   unit         fast, single-process
#   integration  several processes, sockets, shared memory
#   concurrency  threads racing; what the TSan build runs
#   slow         more than a few seconds
#   vm           needs the soft-RoCE guest (scripts/rxe-vm)
#   slurm        needs a Slurm cluster (scripts/slurm)
include(GoogleTest)
function(myelin_add_gtest)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main
                        myelin_warnings)
  gtest_discover_tests(${ARG_NAME}
    PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT}
               SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
    DISCOVERY_TIMEOUT 60)
endfunction()
