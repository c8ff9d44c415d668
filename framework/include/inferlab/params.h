// Plugin parameters: the schema a plugin declares (so configs are validated
// before any run starts and `inferlab plugins` can list them) and the resolved
// values it receives. Part of the plugin SDK.
#pragma once

#include <charconv>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace inferlab {

enum class ParamType { Int, Float, Bool, String };

inline const char* param_type_name(ParamType t) {
  switch (t) {
    case ParamType::Int: return "int";
    case ParamType::Float: return "float";
    case ParamType::Bool: return "bool";
    case ParamType::String: return "string";
  }
  return "?";
}

using ParamValue = std::variant<bool, int64_t, double, std::string>;

struct ParamSpec {
  std::string name;
  ParamType type = ParamType::Int;
  ParamValue default_value = int64_t{0};
  std::optional<double> min;          // inclusive, Int and Float only
  std::optional<double> max;          // inclusive, Int and Float only
  std::vector<std::string> choices;   // String only; empty: any string
  std::string help;

  static ParamSpec integer(std::string name, int64_t def, std::optional<double> lo, std::optional<double> hi,
                           std::string help) {
    return {std::move(name), ParamType::Int, def, lo, hi, {}, std::move(help)};
  }
  static ParamSpec real(std::string name, double def, std::optional<double> lo, std::optional<double> hi,
                        std::string help) {
    return {std::move(name), ParamType::Float, def, lo, hi, {}, std::move(help)};
  }
  static ParamSpec boolean(std::string name, bool def, std::string help) {
    return {std::move(name), ParamType::Bool, def, std::nullopt, std::nullopt, {}, std::move(help)};
  }
  static ParamSpec string(std::string name, std::string def, std::vector<std::string> choices, std::string help) {
    return {std::move(name), ParamType::String, std::move(def), std::nullopt, std::nullopt, std::move(choices),
            std::move(help)};
  }
};

// Resolved parameter values: every declared parameter is present (defaults
// filled in by the host), already checked against its spec.
class ParamValues {
 public:
  ParamValues() = default;
  explicit ParamValues(std::map<std::string, ParamValue> values) : values_(std::move(values)) {}

  bool has(const std::string& name) const { return values_.count(name) != 0; }
  int64_t get_int(const std::string& name) const { return std::get<int64_t>(values_.at(name)); }
  double get_float(const std::string& name) const {
    const ParamValue& v = values_.at(name);
    if (const auto* i = std::get_if<int64_t>(&v)) return double(*i);
    return std::get<double>(v);
  }
  bool get_bool(const std::string& name) const { return std::get<bool>(values_.at(name)); }
  const std::string& get_string(const std::string& name) const { return std::get<std::string>(values_.at(name)); }

  void set(const std::string& name, ParamValue value) { values_[name] = std::move(value); }
  const std::map<std::string, ParamValue>& all() const { return values_; }

 private:
  std::map<std::string, ParamValue> values_;
};

// Canonical text of a value, used in run hashes, the database and reports:
// ints as decimal, floats with the shortest round-trip form, bools as true/false.
inline std::string param_value_to_string(const ParamValue& value) {
  if (const auto* b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (const auto* i = std::get_if<int64_t>(&value)) return std::to_string(*i);
  if (const auto* d = std::get_if<double>(&value)) {
    char buf[64];
    auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), *d);
    return ec == std::errc() ? std::string(buf, end) : std::string("nan");
  }
  return std::get<std::string>(value);
}

}  // namespace inferlab
