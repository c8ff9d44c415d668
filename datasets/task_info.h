// A task type as the task library describes it to the config parser and
// `inferlab tasks`: its parameter schema, and the resolved parameters a task
// is made from.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "inferlab/params.h"

namespace inferlab {

// A task parameter. `list` parameters take a TOML array of `spec.type` (each
// element checked against the spec's range); a scalar given for a list
// parameter is a one-element list. Task parameters are never grid axes.
struct TaskParamSpec {
  ParamSpec spec;
  bool list = false;
  std::vector<ParamValue> list_default = {};  // list parameters: the default list (empty: {spec.default_value})

  std::vector<ParamValue> default_values() const {
    return list && !list_default.empty() ? list_default : std::vector<ParamValue>{spec.default_value};
  }
};

struct TaskInfo {
  std::string name;         // e.g. "passkey"
  std::string description;  // one line
  std::vector<TaskParamSpec> params;
};

// Resolved task parameters: every declared parameter present (defaults filled
// in), each as a list of values (scalars are one-element lists).
class TaskParams {
 public:
  TaskParams() = default;
  explicit TaskParams(std::map<std::string, std::vector<ParamValue>> values) : values_(std::move(values)) {}

  bool has(const std::string& name) const { return values_.count(name) != 0; }
  int64_t get_int(const std::string& name) const { return std::get<int64_t>(values_.at(name).at(0)); }
  double get_float(const std::string& name) const { return as_double(values_.at(name).at(0)); }
  bool get_bool(const std::string& name) const { return std::get<bool>(values_.at(name).at(0)); }
  const std::string& get_string(const std::string& name) const {
    return std::get<std::string>(values_.at(name).at(0));
  }
  std::vector<int64_t> get_int_list(const std::string& name) const {
    std::vector<int64_t> out;
    for (const auto& v : values_.at(name)) out.push_back(std::get<int64_t>(v));
    return out;
  }
  std::vector<double> get_float_list(const std::string& name) const {
    std::vector<double> out;
    for (const auto& v : values_.at(name)) out.push_back(as_double(v));
    return out;
  }
  void set(const std::string& name, std::vector<ParamValue> values) { values_[name] = std::move(values); }
  const std::map<std::string, std::vector<ParamValue>>& all() const { return values_; }

 private:
  static double as_double(const ParamValue& v) {
    if (const auto* i = std::get_if<int64_t>(&v)) return double(*i);
    return std::get<double>(v);
  }
  std::map<std::string, std::vector<ParamValue>> values_;
};

}  // namespace inferlab
