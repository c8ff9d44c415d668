// A plugin built for another ABI version: the host must refuse it before
// calling its factory (which would abort the test if it were called).
#include <cstdlib>

#include "inferlab/plugin_export.h"

namespace wrong_abi {
std::unique_ptr<inferlab::Plugin> make_plugin() { std::abort(); }
const int32_t abi_version = inferlab::kPluginAbiVersion + 99;
}  // namespace wrong_abi

BOOST_DLL_ALIAS(wrong_abi::make_plugin, inferlab_plugin_factory)
BOOST_DLL_ALIAS(wrong_abi::abi_version, inferlab_plugin_abi_version)
