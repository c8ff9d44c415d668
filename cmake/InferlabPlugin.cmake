# inferlab_add_plugin(<name> SOURCES <files...> [OUTPUT_DIR <dir>])
# Builds a method plugin as a shared library that sees only the plugin SDK
# (framework/include) and Boost.DLL's headers: plugins never link the host.
# Symbols are hidden except the factory and ABI aliases INFERLAB_PLUGIN exports,
# so one plugin's symbols cannot shadow another's.
function(inferlab_add_plugin name)
  cmake_parse_arguments(ARG "" "OUTPUT_DIR" "SOURCES" ${ARGN})
  if(NOT ARG_OUTPUT_DIR)
    set(ARG_OUTPUT_DIR ${INFERLAB_PLUGIN_OUTPUT_DIR})
  endif()
  add_library(${name} MODULE ${ARG_SOURCES})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/framework/include)
  target_link_libraries(${name} PRIVATE Boost::headers)
  set_target_properties(${name} PROPERTIES
    PREFIX "" OUTPUT_NAME "inferlab-plugin-${name}"
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
    LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIR})
  target_compile_options(${name} PRIVATE -O2)
  if(TARGET inferlab)
    add_dependencies(inferlab ${name})
  endif()
endfunction()
