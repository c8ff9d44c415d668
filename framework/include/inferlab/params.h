// Plugin parameters: the schema a plugin declares (so configs are validated
// before any run starts and `inferlab plugins` can list them) and the resolved
// values it receives. Part of the plugin SDK.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace inferlab {

// Parameter types. Beyond scalars:
//   Path      a file or folder the method reads (an adapter, a pattern file, a
//             text). A relative path means next to the config; it must exist,
//             and the SHA-256 of its content (not its name; a folder's: its
//             files' names and contents) enters the run hash, so an edited
//             file makes its runs pending again. The method receives the
//             absolute path as a string.
//   PathList  several such paths, one value (several adapters in one run).
//   Schedule  one value per layer, written "0-1=1.0; 2-9=0.6; 10-29=0.3"
//             (parse_layer_schedule); a string.
//   IntList, FloatList  a list that is the value (per-layer budgets, say).
// A list in a config is a grid axis for a scalar parameter (one run per
// element); for a list-typed parameter the list is the value, and a list of
// lists is its grid axis.
enum class ParamType { Int, Float, Bool, String, Path, Schedule, IntList, FloatList, PathList };

inline const char* param_type_name(ParamType t) {
  switch (t) {
    case ParamType::Int: return "int";
    case ParamType::Float: return "float";
    case ParamType::Bool: return "bool";
    case ParamType::String: return "string";
    case ParamType::Path: return "path";
    case ParamType::Schedule: return "schedule";
    case ParamType::IntList: return "int list";
    case ParamType::FloatList: return "float list";
    case ParamType::PathList: return "path list";
  }
  return "?";
}

inline bool param_type_is_list(ParamType t) {
  return t == ParamType::IntList || t == ParamType::FloatList || t == ParamType::PathList;
}

using ParamValue = std::variant<bool, int64_t, double, std::string, std::vector<int64_t>, std::vector<double>,
                                std::vector<std::string>>;

struct ParamSpec {
  std::string name;
  ParamType type = ParamType::Int;
  ParamValue default_value = int64_t{0};
  std::optional<double> min;          // inclusive: Int and Float, and each element of a list or schedule
  std::optional<double> max;          // inclusive, likewise
  std::vector<std::string> choices;   // String only; empty: any string
  std::string help;
  // False for a parameter that only steers the runs (a threshold applied at
  // run time): its value does not key the calibration artifacts (calibration.h),
  // so a grid over it calibrates once. It still enters every run's hash.
  bool keys_calibration = true;

  // This spec, its value left out of the calibration key.
  ParamSpec run_time() && {
    keys_calibration = false;
    return std::move(*this);
  }

  static ParamSpec integer(std::string name, int64_t def, std::optional<double> lo, std::optional<double> hi,
                           std::string help) {
    return {std::move(name), ParamType::Int, def, lo, hi, {}, std::move(help)};
  }
  // Shared names mean the same in every plugin (the host refuses another
  // declaration of them): `dense_layers` is the count of first layers a method
  // leaves dense.
  static ParamSpec dense_layers(int64_t def) {
    return integer("dense_layers", def, 0, std::nullopt, "count of first layers left dense");
  }
  // The shared names of a calibrating method's data: `corpus` ("kjv",
  // "kv_retrieval" or a text file), `calibration_samples` windows of
  // `calibration_tokens` tokens (read back with calibration_request in plugin.h).
  static std::vector<ParamSpec> calibration(int64_t samples, int64_t tokens) {
    return {string("corpus", "kjv", {}, "calibration corpus: kjv, kv_retrieval, or a text file"),
            integer("calibration_samples", samples, 1, 4096, "calibration windows"),
            integer("calibration_tokens", tokens, 8, 1 << 16, "tokens per calibration window")};
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
  // A file; the default "" means none (the method then uses none).
  static ParamSpec path(std::string name, std::string help) {
    return {std::move(name), ParamType::Path, std::string(), std::nullopt, std::nullopt, {}, std::move(help)};
  }
  // Files or folders; the default [] means none.
  static ParamSpec path_list(std::string name, std::string help) {
    return {std::move(name), ParamType::PathList, std::vector<std::string>{}, std::nullopt, std::nullopt, {},
            std::move(help)};
  }
  static ParamSpec schedule(std::string name, std::string def, std::optional<double> lo, std::optional<double> hi,
                            std::string help) {
    return {std::move(name), ParamType::Schedule, std::move(def), lo, hi, {}, std::move(help)};
  }
  static ParamSpec int_list(std::string name, std::vector<int64_t> def, std::optional<double> lo,
                            std::optional<double> hi, std::string help) {
    return {std::move(name), ParamType::IntList, std::move(def), lo, hi, {}, std::move(help)};
  }
  static ParamSpec float_list(std::string name, std::vector<double> def, std::optional<double> lo,
                              std::optional<double> hi, std::string help) {
    return {std::move(name), ParamType::FloatList, std::move(def), lo, hi, {}, std::move(help)};
  }
};

// A per-layer schedule: inclusive layer ranges, each with a value, written
// "0-1=1.0; 2-9=0.6; 10-29=0.3" (a single layer as "5=0.2"; spaces anywhere).
// Ranges may not overlap; layers outside every range take the caller's
// fallback. One grammar for every plugin.
struct LayerSchedule {
  struct Range {
    int32_t first = 0, last = 0;
    double value = 0;
  };
  std::vector<Range> ranges;  // ascending, disjoint

  double at(int32_t layer, double fallback) const {
    for (const Range& r : ranges)
      if (layer >= r.first && layer <= r.last) return r.value;
    return fallback;
  }
  // The layers it names exist in a model of n_layers: "" or why not.
  std::string check_layers(int32_t n_layers) const {
    for (const Range& r : ranges)
      if (r.last >= n_layers)
        return "layer " + std::to_string(r.last) + " is past the model's last layer " + std::to_string(n_layers - 1);
    return "";
  }
};

// Parses a schedule; on a bad one returns nullopt and says why in `why`.
inline std::optional<LayerSchedule> parse_layer_schedule(std::string_view text, std::string* why = nullptr) {
  auto fail = [&](const std::string& reason) -> std::optional<LayerSchedule> {
    if (why != nullptr) *why = reason;
    return std::nullopt;
  };
  auto trim = [](std::string_view v) {
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
    return v;
  };
  auto integer = [](std::string_view v, int32_t& out) {
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
    return ec == std::errc() && end == v.data() + v.size() && out >= 0;
  };
  LayerSchedule schedule;
  while (!text.empty()) {
    const size_t semi = text.find(';');
    const std::string_view item = trim(text.substr(0, semi));
    text = semi == std::string_view::npos ? std::string_view() : text.substr(semi + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) return fail("\"" + std::string(item) + "\" has no \"=value\"");
    const std::string_view layers = trim(item.substr(0, eq)), value = trim(item.substr(eq + 1));
    LayerSchedule::Range r;
    const size_t dash = layers.find('-');
    const bool ok = dash == std::string_view::npos
                        ? integer(layers, r.first) && (r.last = r.first, true)
                        : integer(trim(layers.substr(0, dash)), r.first) && integer(trim(layers.substr(dash + 1)), r.last);
    if (!ok) return fail("\"" + std::string(layers) + "\" is not a layer or a range FIRST-LAST of layers");
    if (r.last < r.first) return fail("range " + std::string(layers) + " ends before it starts");
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), r.value);
    if (ec != std::errc() || end != value.data() + value.size() || value.empty())
      return fail("\"" + std::string(value) + "\" (for layers " + std::string(layers) + ") is not a number");
    schedule.ranges.push_back(r);
  }
  std::sort(schedule.ranges.begin(), schedule.ranges.end(),
            [](const LayerSchedule::Range& a, const LayerSchedule::Range& b) { return a.first < b.first; });
  for (size_t i = 1; i < schedule.ranges.size(); ++i)
    if (schedule.ranges[i].first <= schedule.ranges[i - 1].last)
      return fail("layer " + std::to_string(schedule.ranges[i].first) + " is in two ranges");
  return schedule;
}

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
  // String, Path and Schedule parameters.
  const std::string& get_string(const std::string& name) const { return std::get<std::string>(values_.at(name)); }
  const std::vector<int64_t>& get_int_list(const std::string& name) const {
    return std::get<std::vector<int64_t>>(values_.at(name));
  }
  const std::vector<double>& get_float_list(const std::string& name) const {
    return std::get<std::vector<double>>(values_.at(name));
  }
  // A PathList parameter: absolute paths.
  const std::vector<std::string>& get_path_list(const std::string& name) const {
    return std::get<std::vector<std::string>>(values_.at(name));
  }
  // A Schedule parameter, parsed (the host checked its grammar).
  LayerSchedule get_schedule(const std::string& name) const {
    return parse_layer_schedule(get_string(name)).value_or(LayerSchedule{});
  }

  void set(const std::string& name, ParamValue value) { values_[name] = std::move(value); }
  const std::map<std::string, ParamValue>& all() const { return values_; }

 private:
  std::map<std::string, ParamValue> values_;
};

// Canonical text of a value, used in run hashes, the database and reports:
// ints as decimal, floats with the shortest round-trip form, bools as
// true/false, lists as [a, b, c].
inline std::string param_value_to_string(const ParamValue& value) {
  auto number = [](double d) {
    char buf[64];
    auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d);
    return ec == std::errc() ? std::string(buf, end) : std::string("nan");
  };
  auto list = [](const auto& items, auto&& one) {
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i) out += (i > 0 ? ", " : "") + one(items[i]);
    return out + "]";
  };
  if (const auto* b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (const auto* i = std::get_if<int64_t>(&value)) return std::to_string(*i);
  if (const auto* d = std::get_if<double>(&value)) return number(*d);
  if (const auto* v = std::get_if<std::vector<int64_t>>(&value))
    return list(*v, [](int64_t x) { return std::to_string(x); });
  if (const auto* v = std::get_if<std::vector<double>>(&value)) return list(*v, number);
  if (const auto* v = std::get_if<std::vector<std::string>>(&value))
    return list(*v, [](const std::string& x) { return x; });
  return std::get<std::string>(value);
}

}  // namespace inferlab
