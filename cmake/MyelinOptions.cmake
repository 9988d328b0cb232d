# Compiler warnings and sanitizers, applied per target through myelin_target_defaults().
add_library(myelin_warnings INTERFACE)
target_compile_options(myelin_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align
  -Wimplicit-fallthrough -Wno-missing-field-initializers
  $<$<BOOL:${MYELIN_WERROR}>:-Werror>)

if(MYELIN_SANITIZE)
  string(REPLACE ";" "," _myelin_san "${MYELIN_SANITIZE}")
  add_compile_options(-fsanitize=${_myelin_san} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${_myelin_san})
endif()

# myelin_add_library(NAME <layer> SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
# Creates target myelin_<layer> (alias myelin::<layer>, output libmyelin_<layer>) with its public
# headers under <layer>/include, registers it for install/export and pkg-config.
function(myelin_add_library)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  set(tgt myelin_${ARG_NAME})
  add_library(${tgt} ${ARG_SOURCES})
  add_library(myelin::${ARG_NAME} ALIAS ${tgt})
  set_target_properties(${tgt} PROPERTIES EXPORT_NAME ${ARG_NAME}
    VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR})
  target_include_directories(${tgt} PUBLIC
    $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>
    $<BUILD_INTERFACE:${MYELIN_GENERATED_INCLUDE_DIR}>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>
    PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_compile_features(${tgt} PUBLIC cxx_std_20)
  target_link_libraries(${tgt} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS}
    $<BUILD_INTERFACE:myelin_warnings>)
  install(TARGETS ${tgt} EXPORT myelinTargets
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  set_property(GLOBAL APPEND PROPERTY MYELIN_PC_LIBS ${tgt})
endfunction()

# myelin_add_executable(NAME <name> SOURCES ... DEPS ... [INSTALL])
function(myelin_add_executable)
  cmake_parse_arguments(ARG "INSTALL" "NAME" "SOURCES;DEPS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} myelin_warnings)
  if(ARG_INSTALL)
    install(TARGETS ${ARG_NAME} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
endfunction()
