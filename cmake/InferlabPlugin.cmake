# inferlab_add_plugin(<name> SOURCES <files...> [OUTPUT_DIR <dir>])
# Builds a method plugin as a shared library that sees only the plugin SDK
# (INFERLAB_SDK_INCLUDE_DIR: framework/include in this tree, include/ of an
# installed SDK) and Boost.DLL's headers: plugins never link the host.
# Used in this tree and, through find_package(inferlab), by plugins outside it.
# Symbols are hidden except the factory and ABI aliases INFERLAB_PLUGIN exports,
# so one plugin's symbols cannot shadow another's.
function(inferlab_add_plugin name)
  cmake_parse_arguments(ARG "" "OUTPUT_DIR" "SOURCES" ${ARGN})
  set(shipped OFF)  # this tree's method plugins (not its test plugins, which name their folder)
  if(NOT ARG_OUTPUT_DIR)
    set(ARG_OUTPUT_DIR ${INFERLAB_PLUGIN_OUTPUT_DIR})
    set(shipped ${INFERLAB_IN_TREE})
  endif()
  add_library(${name} MODULE ${ARG_SOURCES})
  target_include_directories(${name} PRIVATE ${INFERLAB_SDK_INCLUDE_DIR})
  target_link_libraries(${name} PRIVATE Boost::headers)
  set_target_properties(${name} PROPERTIES
    PREFIX "" OUTPUT_NAME "inferlab-plugin-${name}"
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
    LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIR})
  target_compile_options(${name} PRIVATE -O2)
  if(INFERLAB_IN_TREE AND TARGET inferlab)
    add_dependencies(inferlab ${name})
  endif()
  if(shipped)
    install(TARGETS ${name} LIBRARY DESTINATION lib/inferlab/plugins)
  endif()
endfunction()
