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
  # Per-label aggregate targets (myelin_tests_unit, ...) let sanitizer trees build only what
  # their ctest label selection runs.
  foreach(label ${ARG_LABELS})
    set_property(GLOBAL APPEND PROPERTY MYELIN_TESTS_${label} ${ARG_NAME})
  endforeach()
  gtest_discover_tests(${ARG_NAME}
    PROPERTIES TIMEOUT ${ARG_TIMEOUT} SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
    DISCOVERY_TIMEOUT 60)
  # Labels go on after discovery: gtest_discover_tests() flattens a list handed to PROPERTIES, so
  # a test with two labels would get only the first (and lose the properties after it). This
  # script runs, in ctest, after the discovery script that filled <target>_TESTS.
  set(labels_script "${CMAKE_CURRENT_BINARY_DIR}/${ARG_NAME}_labels.cmake")
  file(WRITE "${labels_script}"
       "if(${ARG_NAME}_TESTS)\n"
       "  set_tests_properties(\${${ARG_NAME}_TESTS} PROPERTIES LABELS \"${ARG_LABELS}\")\n"
       "endif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${labels_script}")
endfunction()

# Called once after every test folder was added: one target per label.
function(myelin_add_label_targets)
  foreach(label unit integration concurrency slow vm slurm)
    get_property(targets GLOBAL PROPERTY MYELIN_TESTS_${label})
    add_custom_target(myelin_tests_${label})
    if(targets)
      add_dependencies(myelin_tests_${label} ${targets})
    endif()
  endforeach()
endfunction()
