#include "plugins/param_check.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace inferlab {

bool value_has_type(const ParamValue& v, ParamType t) {
  switch (t) {
    case ParamType::Int: return std::holds_alternative<int64_t>(v);
    case ParamType::Float: return std::holds_alternative<double>(v) || std::holds_alternative<int64_t>(v);
    case ParamType::Bool: return std::holds_alternative<bool>(v);
    case ParamType::String:
    case ParamType::Path:
    case ParamType::Schedule: return std::holds_alternative<std::string>(v);
    case ParamType::IntList: return std::holds_alternative<std::vector<int64_t>>(v);
    case ParamType::FloatList: return std::holds_alternative<std::vector<double>>(v);
    case ParamType::PathList: return std::holds_alternative<std::vector<std::string>>(v);
  }
  return false;
}

std::string describe_value(const ParamValue& v) {
  if (std::holds_alternative<std::string>(v)) return fmt::format("\"{}\"", std::get<std::string>(v));
  return param_value_to_string(v);
}

namespace {

std::string bound_text(double bound, ParamType type) {
  return type == ParamType::Int || type == ParamType::IntList ? std::to_string(int64_t(bound))
                                                              : param_value_to_string(bound);
}

// A number against the spec's range.
std::string range_problem(const ParamSpec& spec, double x, const std::string& text) {
  if (std::isnan(x)) return "nan is not a usable value";
  if (spec.min && x < *spec.min) return fmt::format("value {} is below the minimum {}", text, bound_text(*spec.min, spec.type));
  if (spec.max && x > *spec.max) return fmt::format("value {} is above the maximum {}", text, bound_text(*spec.max, spec.type));
  return "";
}

}  // namespace

std::string param_problem(const ParamSpec& spec, const ParamValue& value) {
  if (!value_has_type(value, spec.type))
    return fmt::format("expected {}, got {}", param_type_name(spec.type), describe_value(value));
  switch (spec.type) {
    case ParamType::Int:
    case ParamType::Float: {
      const double x = std::holds_alternative<int64_t>(value) ? double(std::get<int64_t>(value)) : std::get<double>(value);
      return range_problem(spec, x, param_value_to_string(value));
    }
    case ParamType::String: {
      const auto& s = std::get<std::string>(value);
      if (spec.choices.empty() || std::find(spec.choices.begin(), spec.choices.end(), s) != spec.choices.end()) return "";
      return fmt::format("\"{}\" is not one of: {}", s, fmt::join(spec.choices, ", "));
    }
    case ParamType::Schedule: {
      std::string why;
      const auto schedule = parse_layer_schedule(std::get<std::string>(value), &why);
      if (!schedule) return "schedule: " + why;
      for (const auto& r : schedule->ranges)
        if (auto p = range_problem(spec, r.value, param_value_to_string(r.value)); !p.empty())
          return fmt::format("schedule, layers {}-{}: {}", r.first, r.last, p);
      return "";
    }
    case ParamType::IntList:
      for (int64_t x : std::get<std::vector<int64_t>>(value))
        if (auto p = range_problem(spec, double(x), std::to_string(x)); !p.empty()) return p;
      return "";
    case ParamType::FloatList:
      for (double x : std::get<std::vector<double>>(value))
        if (auto p = range_problem(spec, x, param_value_to_string(x)); !p.empty()) return p;
      return "";
    case ParamType::Bool:
    case ParamType::Path:
    case ParamType::PathList: return "";
  }
  return "";
}

}  // namespace inferlab
