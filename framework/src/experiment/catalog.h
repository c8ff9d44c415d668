// What an experiment config may name: tasks (with their parameter schemas,
// datasets/task_info.h) and plugins (as the host found them,
// plugins/plugin_entry.h). The config parser validates against these; the task
// library and the plugin host fill them in.
#pragma once

#include <string>
#include <vector>

#include "datasets/task_info.h"
#include "plugins/plugin_entry.h"

namespace inferlab {

struct Catalog {
  std::vector<TaskInfo> tasks;
  std::vector<PluginEntry> plugins;

  const TaskInfo* find_task(const std::string& name) const {
    for (const auto& t : tasks)
      if (t.name == name) return &t;
    return nullptr;
  }
  const PluginEntry* find_plugin(const std::string& name) const {
    for (const auto& p : plugins)
      if (p.name == name) return &p;
    return nullptr;
  }
};

}  // namespace inferlab
