// Finds, checks and loads method plugins (shared libraries built against the
// SDK in framework/include/inferlab). A library is accepted only if it exports
// the ABI version and factory aliases, was built for this ABI version, and
// describes itself consistently; anything else is refused with the file and
// the reason. Libraries stay loaded for the registry's lifetime, and every
// Method handed out keeps its library alive.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "plugins/plugin_entry.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"

namespace boost::dll {
class shared_library;
}

namespace inferlab {

// A Method together with the library that made it; destroys the Method first.
class MethodHandle {
 public:
  MethodHandle() = default;
  MethodHandle(std::shared_ptr<boost::dll::shared_library> library, std::unique_ptr<Method> method)
      : library_(std::move(library)), method_(std::move(method)) {}
  MethodHandle(MethodHandle&&) = default;
  MethodHandle& operator=(MethodHandle&& other) noexcept {
    method_ = std::move(other.method_);
    library_ = std::move(other.library_);
    return *this;
  }
  ~MethodHandle() { method_.reset(); }
  Method* get() const { return method_.get(); }
  Method* operator->() const { return method_.get(); }

 private:
  std::shared_ptr<boost::dll::shared_library> library_;  // declared first: destroyed last
  std::unique_ptr<Method> method_;
};

class PluginRegistry {
 public:
  PluginRegistry();
  ~PluginRegistry();
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;

  // The folders searched by default: each entry of $INFERLAB_PLUGIN_PATH
  // (colon-separated; a file entry is loaded directly), then the `plugins`
  // folder beside the running executable.
  static std::vector<std::filesystem::path> default_search_path();

  // Loads every *.so in the folders (or the files named). Libraries that are
  // refused, and names already taken, are recorded in problems(); the scan
  // itself fails only if a folder cannot be read.
  Status scan(const std::vector<std::filesystem::path>& paths);
  // Loads one library; the error names the file and the reason.
  Status load(const std::filesystem::path& file);

  const std::vector<PluginEntry>& entries() const { return entries_; }
  const PluginEntry* find(const std::string& name) const;
  const std::vector<std::string>& problems() const { return problems_; }

  // A configured Method from plugin `name`; params are completed with defaults
  // and checked against the schema.
  Result<MethodHandle> create(const std::string& name, const ParamValues& params) const;

 private:
  struct Loaded;
  std::vector<std::unique_ptr<Loaded>> loaded_;
  std::vector<PluginEntry> entries_;
  std::vector<std::string> problems_;
};

// Checks what a plugin declares: its name, version, hooks, and parameters
// (unique, valid defaults, shared names such as dense_layers declared as in
// every plugin).
Status check_plugin_info(const PluginInfo& info);

// Checks a value against its spec; the error says what is wrong with it.
Status check_param_value(const ParamSpec& spec, const ParamValue& value);

}  // namespace inferlab
