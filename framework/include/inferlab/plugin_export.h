// Exporting a plugin: the one header of the SDK that pulls in Boost.DLL, so
// only plugin sources (one file each) see it; everything else a plugin uses is
// in inferlab/plugin.h.
#pragma once

#include <memory>

#include "inferlab/plugin.h"

// Exports a plugin class (default-constructible, derived from inferlab::Plugin)
// from a shared library: the ABI version and the factory, as Boost.DLL aliases.
// Use once per library, at namespace scope.
#include <boost/dll/alias.hpp>

#define INFERLAB_PLUGIN(PluginClass)                                                      \
  namespace inferlab_plugin_export {                                                      \
  inline std::unique_ptr<::inferlab::Plugin> make_plugin() {                              \
    return std::make_unique<PluginClass>();                                               \
  }                                                                                       \
  inline const int32_t abi_version = ::inferlab::kPluginAbiVersion;                       \
  }                                                                                       \
  BOOST_DLL_ALIAS(inferlab_plugin_export::make_plugin, inferlab_plugin_factory)           \
  BOOST_DLL_ALIAS(inferlab_plugin_export::abi_version, inferlab_plugin_abi_version)
