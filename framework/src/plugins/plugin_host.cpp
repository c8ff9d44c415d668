#include "plugins/plugin_host.h"

#include "plugins/param_check.h"

#include <fmt/format.h>

#include <algorithm>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <regex>

namespace inferlab {

namespace {

using Factory = std::unique_ptr<Plugin>();

}  // namespace

// The plugin's own description must be usable before anything trusts it.
Status check_plugin_info(const PluginInfo& info) {
  static const std::regex name_re("[a-z0-9][a-z0-9_-]*");
  if (!std::regex_match(info.name, name_re))
    return Error{fmt::format("plugin name \"{}\" must match [a-z0-9][a-z0-9_-]*", info.name)};
  if (info.version.empty()) return Error{fmt::format("plugin {} declares no version", info.name)};
  if ((info.hooks & ~kAllHooks) != 0)
    return Error{fmt::format("plugin {} declares unknown hook bits {:#x}", info.name, info.hooks & ~kAllHooks)};
  std::vector<std::string> seen;
  for (const ParamSpec& p : info.params) {
    if (p.name.empty() || p.name == "plugin" || p.name == "name")
      return Error{fmt::format("plugin {} declares a parameter named \"{}\", which is reserved", info.name, p.name)};
    if (std::find(seen.begin(), seen.end(), p.name) != seen.end())
      return Error{fmt::format("plugin {} declares parameter {} twice", info.name, p.name)};
    seen.push_back(p.name);
    if (auto s = check_param_value(p, p.default_value); !s)
      return Error{fmt::format("plugin {}: the default of {} is invalid: {}", info.name, p.name, s.message())};
    if (p.name == "dense_layers" && (p.type != ParamType::Int || p.min != 0.0))
      return Error{fmt::format("plugin {} declares dense_layers otherwise than every plugin: it is the count of first "
                               "layers left dense, an int from 0 (declare it with ParamSpec::dense_layers)",
                               info.name)};
  }
  return ok_status();
}

Status check_param_value(const ParamSpec& spec, const ParamValue& value) {
  if (const std::string why = param_problem(spec, value); !why.empty())
    return Error{fmt::format("{}: {}", spec.name, why)};
  return ok_status();
}

struct PluginRegistry::Loaded {
  std::shared_ptr<boost::dll::shared_library> library;
  std::unique_ptr<Plugin> plugin;
  PluginInfo info;
};

PluginRegistry::PluginRegistry() = default;

PluginRegistry::~PluginRegistry() {
  // Plugins are objects of their libraries: destroy them before unloading.
  for (auto& l : loaded_) l->plugin.reset();
}

std::vector<std::filesystem::path> PluginRegistry::default_search_path() {
  std::vector<std::filesystem::path> paths;
  if (const char* env = std::getenv("INFERLAB_PLUGIN_PATH"); env != nullptr) {
    std::string list = env;
    for (size_t start = 0; start <= list.size();) {
      const size_t end = std::min(list.find(':', start), list.size());
      if (end > start) paths.emplace_back(list.substr(start, end - start));
      start = end + 1;
    }
  }
  boost::system::error_code ec;
  const auto exe = boost::dll::program_location(ec);
  if (!ec) {
    const std::filesystem::path bin(exe.parent_path().string());
    paths.push_back(bin / "plugins");                            // a build tree
    paths.push_back(bin.parent_path() / "lib/inferlab/plugins");  // an installed prefix
  }
  return paths;
}

Status PluginRegistry::scan(const std::vector<std::filesystem::path>& paths) {
  for (const auto& path : paths) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(path, ec)) {
      if (auto s = load(path); !s) problems_.push_back(s.message());
      continue;
    }
    if (!std::filesystem::is_directory(path, ec)) continue;  // a search folder may be absent
    std::vector<std::filesystem::path> files;
    for (std::filesystem::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".so") files.push_back(it->path());
    if (ec) return Error{fmt::format("{}: cannot list plugin folder: {}", path.string(), ec.message())};
    std::sort(files.begin(), files.end());
    for (const auto& f : files)
      if (auto s = load(f); !s) problems_.push_back(s.message());
  }
  return ok_status();
}

Status PluginRegistry::load(const std::filesystem::path& file) {
  const std::string where = file.string();
  auto library = std::make_shared<boost::dll::shared_library>();
  boost::system::error_code ec;
  library->load(boost::dll::fs::path(file.string()), boost::dll::load_mode::rtld_local | boost::dll::load_mode::rtld_now, ec);
  if (ec) return Error{fmt::format("{}: not a loadable shared library: {}", where, ec.message())};
  if (!library->has("inferlab_plugin_abi_version") || !library->has("inferlab_plugin_factory"))
    return Error{fmt::format("{}: not an inferlab plugin (it exports no inferlab_plugin_abi_version / "
                             "inferlab_plugin_factory; use INFERLAB_PLUGIN from inferlab/plugin_export.h)", where)};
  const int32_t abi = library->get_alias<const int32_t>("inferlab_plugin_abi_version");
  if (abi != kPluginAbiVersion)
    return Error{fmt::format("{}: built for plugin ABI version {}, this inferlab uses version {}; rebuild the plugin "
                             "against this SDK", where, abi, kPluginAbiVersion)};
  auto loaded = std::make_unique<Loaded>();
  loaded->library = library;
  try {
    loaded->plugin = library->get_alias<Factory>("inferlab_plugin_factory")();
    if (!loaded->plugin) return Error{fmt::format("{}: the plugin factory returned nothing", where)};
    loaded->info = loaded->plugin->info();
  } catch (const std::exception& e) {
    return Error{fmt::format("{}: the plugin factory threw: {}", where, e.what())};
  }
  if (auto s = check_plugin_info(loaded->info); !s) return Error{fmt::format("{}: {}", where, s.message())};
  if (const PluginEntry* other = find(loaded->info.name); other != nullptr) {
    loaded->plugin.reset();
    return Error{fmt::format("{}: plugin name \"{}\" is already taken by {}; ignored", where, loaded->info.name,
                             other->path)};
  }
  const PluginInfo& info = loaded->info;
  entries_.push_back(PluginEntry{info.name, info.version, info.description, info.hooks, info.params, where});
  loaded_.push_back(std::move(loaded));
  return ok_status();
}

const PluginEntry* PluginRegistry::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

Result<MethodHandle> PluginRegistry::create(const std::string& name, const ParamValues& params) const {
  const Loaded* loaded = nullptr;
  for (const auto& l : loaded_)
    if (l->info.name == name) loaded = l.get();
  if (loaded == nullptr) return Error{fmt::format("no plugin named \"{}\" is loaded", name)};
  ParamValues resolved;
  for (const ParamSpec& spec : loaded->info.params) {
    ParamValue value = params.has(spec.name) ? params.all().at(spec.name) : spec.default_value;
    if (spec.type == ParamType::Float && std::holds_alternative<int64_t>(value))
      value = double(std::get<int64_t>(value));
    if (auto s = check_param_value(spec, value); !s) return Error{fmt::format("plugin {}: {}", name, s.message())};
    resolved.set(spec.name, std::move(value));
  }
  for (const auto& [key, value] : params.all())
    if (!resolved.has(key)) return Error{fmt::format("plugin {} has no parameter \"{}\"", name, key)};
  try {
    auto method = loaded->plugin->create(resolved);
    if (!method) return Error{fmt::format("plugin {}: {}", name, method.message())};
    if (!*method) return Error{fmt::format("plugin {}: create() returned no method", name)};
    return MethodHandle(loaded->library, std::move(*method));
  } catch (const std::exception& e) {
    return Error{fmt::format("plugin {}: create() threw: {}", name, e.what())};
  }
}

}  // namespace inferlab
