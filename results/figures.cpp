#include "results/figures.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace inferlab {

namespace {

using json = nlohmann::json;

// ---- what a figure's y axis shows ------------------------------------------

enum class Kind { Quality, Speed, Memory };

struct Quantity {
  const char* key;    // in figure ids
  const char* title;  // in figure titles
  const char* label;  // the y axis
  Kind kind;
  // The value of a run, given its section's baseline (null when none).
  std::function<std::optional<double>(const StoredRun&, const StoredRun*)> value;
  // Its interval in the same unit, where the report computes one.
  std::function<std::optional<Interval>(const StoredRun&)> interval;
  const char* interval_note = nullptr;
  bool log_when_wide = false;
};

std::optional<double> scaled(const StoredRun& run, const char* metric, double scale) {
  const auto v = run_metric(run, metric);
  return v ? std::optional<double>(*v * scale) : std::nullopt;
}

// A method's rate over dense's on the same section.
std::optional<double> ratio(const StoredRun& run, const StoredRun* base, const char* metric) {
  if (base == nullptr) return std::nullopt;
  const auto v = run_metric(run, metric), b = run_metric(*base, metric);
  if (!v || !b || *b <= 0) return std::nullopt;
  return *v / *b;
}

std::optional<Interval> scaled_interval(std::optional<Interval> i, double scale) {
  if (!i) return std::nullopt;
  return Interval{i->lo * scale, i->hi * scale};
}

const std::vector<Quantity>& quantities() {
  static const std::vector<Quantity> all = {
      {"accuracy", "accuracy", "accuracy (%)", Kind::Quality,
       [](const StoredRun& r, const StoredRun*) { return scaled(r, "accuracy", 100); },
       [](const StoredRun& r) { return scaled_interval(accuracy_interval(r), 100); },
       "error bars: Wilson 95% intervals over samples"},
      {"perplexity", "perplexity", "perplexity", Kind::Quality,
       [](const StoredRun& r, const StoredRun*) { return run_metric(r, "perplexity"); },
       [](const StoredRun& r) { return perplexity_interval(r); }, "error bars: bootstrap 95% intervals over windows",
       true},
      {"answer-logprob", "answer log-probability", "answer log-probability (nats)", Kind::Quality,
       [](const StoredRun& r, const StoredRun*) { return run_metric(r, "answer_logprob"); },
       [](const StoredRun& r) { return answer_logprob_interval(r); },
       "error bars: bootstrap 95% intervals of the mean over samples"},
      {"top1", "top-1 agreement with dense", "top-1 agreement with dense (%)", Kind::Quality,
       [](const StoredRun& r, const StoredRun*) { return scaled(r, "fidelity_top1", 100); }, nullptr},
      {"kl", "KL divergence from dense", "KL divergence from dense (nats)", Kind::Quality,
       [](const StoredRun& r, const StoredRun*) { return run_metric(r, "fidelity_kl"); }, nullptr},
      {"decode-speedup", "decode speedup over dense", "decode speedup over dense (×)", Kind::Speed,
       [](const StoredRun& r, const StoredRun* base) { return ratio(r, base, "decode_tokens_per_s"); }, nullptr},
      {"prefill-speedup", "prefill speedup over dense", "prefill speedup over dense (×)", Kind::Speed,
       [](const StoredRun& r, const StoredRun* base) { return ratio(r, base, "prefill_tokens_per_s"); }, nullptr},
      {"kv-memory", "KV cache peak", "KV cache peak (MiB)", Kind::Memory,
       [](const StoredRun& r, const StoredRun*) { return scaled(r, "kv_bytes_peak", 1.0 / (1024.0 * 1024.0)); },
       nullptr},
      {"weight-bits", "stored bits per weight", "stored bits per weight (layer projections)", Kind::Memory,
       [](const StoredRun& r, const StoredRun*) { return run_metric(r, "weights_stored_bits_per_param"); }, nullptr},
  };
  return all;
}

// The reference line dense draws: its own value, or 1 for a speedup.
std::optional<json> reference(const Quantity& q, const StoredRun* base) {
  if (base == nullptr) return std::nullopt;
  if (q.kind == Kind::Speed) {
    if (!q.value(*base, base)) return std::nullopt;
    return json{{"name", "dense"}, {"y", 1.0}};
  }
  const auto v = q.value(*base, base);
  if (!v || !std::isfinite(*v)) return std::nullopt;
  json ref = {{"name", "dense"}, {"y", *v}};
  if (q.interval)
    if (const auto i = q.interval(*base)) ref["lo"] = i->lo, ref["hi"] = i->hi;
  return ref;
}

// A point of a run, or nullopt when it lacks the value (or it is not finite).
std::optional<json> point(const Quantity& q, const StoredRun& run, const StoredRun* base, double x) {
  const auto y = q.value(run, base);
  if (!y || !std::isfinite(*y) || !std::isfinite(x)) return std::nullopt;
  json p = {{"x", x}, {"y", *y}};
  if (q.interval)
    if (const auto i = q.interval(run); i && std::isfinite(i->lo) && std::isfinite(i->hi)) p["lo"] = i->lo, p["hi"] = i->hi;
  return p;
}

// ---- runs, their parameters and their families ---------------------------

// A parameter value as a number: JSON numbers, and strings that are one
// (configs record floats as text); booleans and other text are categories.
std::optional<double> numeric(const json& v) {
  if (v.is_number()) return v.get<double>();
  if (v.is_array() && v.size() == 1) return numeric(v[0]);
  if (!v.is_string()) return std::nullopt;
  const std::string& s = v.get_ref<const std::string&>();
  double out = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return out;
}

std::string value_text(const json& v) {
  if (v.is_array() && v.size() == 1) return value_text(v[0]);
  return v.is_string() ? v.get<std::string>() : v.dump();
}

json method_params(const StoredRun& run) {
  const auto config = json::parse(run.config_json, nullptr, false);
  if (config.is_object() && config.contains("params") && config["params"].is_object()) return config["params"];
  return json::object();
}

// The label without the " key=value" suffixes of grid axes ("teal sparsity=0.5": "teal").
std::string label_base(const std::string& label, const json& params) {
  std::vector<std::string> words;
  for (size_t start = 0; start <= label.size();) {
    const size_t end = std::min(label.find(' ', start), label.size());
    words.push_back(label.substr(start, end - start));
    start = end + 1;
  }
  while (words.size() > 1) {
    const std::string& last = words.back();
    const size_t eq = last.find('=');
    if (eq == std::string::npos || !params.contains(last.substr(0, eq))) break;
    words.pop_back();
  }
  return fmt::format("{}", fmt::join(words, " "));
}

struct MethodRun {
  const StoredRun* run;
  json params;
};

// The runs of one method: their parameters, the numeric one they vary along (x)
// and the others that vary independently of it (each value its own series).
struct Family {
  std::string plugin, name;
  std::vector<MethodRun> runs;
  std::string x;                     // empty: no numeric axis (bars)
  std::vector<std::string> split;    // parameters that split the family into series
  std::vector<std::string> along;    // parameters that vary with x (named in a note)
};

std::vector<std::string> varying_keys(const std::vector<MethodRun>& runs) {
  std::set<std::string> keys;
  for (const MethodRun& m : runs)
    for (const auto& [k, v] : m.params.items()) keys.insert(k);
  std::vector<std::string> out;
  for (const std::string& k : keys) {
    std::set<std::string> values;
    for (const MethodRun& m : runs) values.insert(m.params.contains(k) ? m.params[k].dump() : "");
    if (values.size() > 1) out.push_back(k);
  }
  return out;
}

// The name with its last number as '#': "h2o-128" and "h2o-64" are "h2o-#".
std::string number_masked(const std::string& s) {
  const size_t end = s.find_last_of("0123456789");
  if (end == std::string::npos) return s;
  size_t start = end;
  while (start > 0 && std::isdigit(static_cast<unsigned char>(s[start - 1]))) --start;
  return s.substr(0, start) + "#" + s.substr(end + 1);
}

// The name of joined families: the mask without its '#' and the separators around it.
std::string without_number(const std::string& mask) {
  const size_t at = mask.find('#');
  std::string head = mask.substr(0, at), tail = mask.substr(at + 1);
  const auto sep = [](char c) { return c == '-' || c == '_' || c == ' ' || c == '.'; };
  while (!head.empty() && sep(head.back())) head.pop_back();
  while (!tail.empty() && sep(tail.front())) tail.erase(tail.begin());
  return head.empty() || tail.empty() ? head + tail : head + "-" + tail;
}

void choose_axes(Family& f) {
  const std::vector<std::string> varying = varying_keys(f.runs);
  size_t best = 0;
  for (const std::string& k : varying) {
    bool all_numeric = true;
    std::set<double> values;
    for (const MethodRun& m : f.runs) {
      const auto v = m.params.contains(k) ? numeric(m.params[k]) : std::nullopt;
      all_numeric = all_numeric && v.has_value();
      if (v) values.insert(*v);
    }
    if (all_numeric && values.size() > best) best = values.size(), f.x = k;
  }
  if (f.x.empty()) return;
  for (const std::string& k : varying) {
    if (k == f.x) continue;
    // Does x determine k (h2o's recent with its heavy)? Then k is not a series of its own.
    std::map<std::string, std::string> at_x;
    bool determined = true;
    for (const MethodRun& m : f.runs) {
      const std::string x = m.params[f.x].dump(), v = m.params.contains(k) ? m.params[k].dump() : "";
      const auto [it, inserted] = at_x.emplace(x, v);
      determined = determined && (inserted || it->second == v);
    }
    (determined ? f.along : f.split).push_back(k);
  }
}

// The families of a section's method runs, in order of first appearance.
std::vector<Family> families(const ReportGroup& g) {
  std::vector<Family> out;
  for (const StoredRun* run : g.runs) {
    if (run == g.baseline) continue;
    MethodRun m{run, method_params(*run)};
    const std::string name = label_base(run->label, m.params);
    auto it = std::find_if(out.begin(), out.end(),
                           [&](const Family& f) { return f.plugin == run->plugin && f.name == name; });
    if (it == out.end()) it = out.insert(out.end(), Family{run->plugin, name, {}, "", {}, {}});
    it->runs.push_back(std::move(m));
  }
  // Methods of one plugin with one setting each whose names differ only in a
  // number (h2o-64, h2o-128: budgets written as separate methods) are one family.
  std::map<std::string, size_t> count;  // single-setting families by plugin and masked name
  std::vector<std::string> keys;
  for (const Family& f : out) {
    const std::string mask = number_masked(f.name);
    const bool joinable = mask != f.name && varying_keys(f.runs).empty() && !without_number(mask).empty();
    keys.push_back(joinable ? f.plugin + '\n' + mask : "");
    if (joinable) ++count[keys.back()];
  }
  std::vector<Family> joined;
  std::map<std::string, size_t> by_mask;
  for (size_t i = 0; i < out.size(); ++i) {
    Family& f = out[i];
    const std::string& key = keys[i];
    if (key.empty() || count[key] < 2) {
      joined.push_back(std::move(f));
      continue;
    }
    if (const auto it = by_mask.find(key); it != by_mask.end()) {
      Family& into = joined[it->second];
      for (MethodRun& m : f.runs) into.runs.push_back(std::move(m));
      continue;
    }
    by_mask[key] = joined.size();
    f.name = without_number(number_masked(f.name));
    joined.push_back(std::move(f));
  }
  for (Family& f : joined) choose_axes(f);
  return joined;
}

// ---- figures ---------------------------------------------------------------

std::string slug(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (std::isalnum(static_cast<unsigned char>(c))) {
      out += char(std::tolower(static_cast<unsigned char>(c)));
    } else if (!out.empty() && out.back() != '-') {
      out += '-';
    }
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out;
}

class Builder {
 public:
  explicit Builder(const ReportData& data) : data_(data) {}

  json build() {
    for (size_t g = 0; g < data_.groups.size(); ++g) section(int(g), data_.groups[g]);
    context_lengths();
    return json{{"experiment", data_.experiment.name}, {"figures", figures_}};
  }

 private:
  int color(const std::string& name) {
    const auto [it, inserted] = colors_.emplace(name, int(colors_.size()));
    return it->second;
  }

  std::string unique_id(const std::string& id) {
    std::string out = id;
    for (int n = 2; !ids_.insert(out).second; ++n) out = fmt::format("{}-{}", id, n);
    return out;
  }

  // Adds a figure unless it has nothing to show: no series with two points
  // (lines), no bar, or a memory quantity equal in every run.
  void add(json figure, const Quantity& q, const std::optional<json>& ref) {
    std::vector<double> ys;
    bool enough = false;
    if (figure["kind"] == "line") {
      for (const json& s : figure["series"]) {
        enough = enough || s["points"].size() >= 2;
        for (const json& p : s["points"]) ys.push_back(p["y"].get<double>());
      }
      // With one line of one point each (the keys-read axis), two points in all will do.
      if (!enough && figure.value("points_suffice", false)) enough = ys.size() >= 2;
    } else {
      for (const json& b : figure["bars"]) ys.push_back(b["y"].get<double>());
      enough = !ys.empty();
    }
    figure.erase("points_suffice");
    if (!enough) return;
    if (ref) ys.push_back((*ref)["y"].get<double>());
    const auto [lo, hi] = std::minmax_element(ys.begin(), ys.end());
    if (q.kind == Kind::Memory && *hi - *lo <= 1e-9 * std::max(1.0, std::abs(*hi))) return;
    bool positive = *lo > 0, intervals = false;
    double top = *hi, bottom = *lo;
    const auto widen = [&](const json& p) {
      if (!p.contains("lo")) return;
      intervals = true;
      bottom = std::min(bottom, p["lo"].get<double>());
      top = std::max(top, p["hi"].get<double>());
      positive = positive && p["lo"].get<double>() > 0;
    };
    if (figure["kind"] == "line") {
      for (const json& s : figure["series"])
        for (const json& p : s["points"]) widen(p);
    } else {
      for (const json& b : figure["bars"]) widen(b);
    }
    if (ref) widen(*ref);
    figure["y_log"] = q.log_when_wide && positive && top / bottom >= 10;
    if (ref) figure["reference"] = *ref;
    if (q.interval_note != nullptr && intervals) figure["notes"].push_back(q.interval_note);
    figure["id"] = unique_id(figure["id"].get<std::string>());
    figures_.push_back(std::move(figure));
  }

  static bool x_log(const std::vector<double>& xs) {
    if (xs.empty()) return false;
    const auto [lo, hi] = std::minmax_element(xs.begin(), xs.end());
    return *lo > 0 && *hi / *lo >= 8;
  }

  json line_figure(int group, const std::string& id, const std::string& title, const std::string& x_label,
                   const Quantity& q) {
    return json{{"id", id},         {"group", group},     {"kind", "line"},       {"title", title},
                {"x_label", x_label}, {"y_label", q.label}, {"series", json::array()}, {"notes", json::array()}};
  }

  // The series of a family: one per value of its splitting parameters.
  json family_series(const Family& f, const Quantity& q, const StoredRun* base,
                     const std::function<std::optional<double>(const MethodRun&)>& x_of) {
    std::vector<std::pair<std::string, json>> series;  // by name, in order of first appearance
    for (const MethodRun& m : f.runs) {
      std::string name = f.name;
      for (const std::string& k : f.split)
        name += fmt::format(" {}={}", k, m.params.contains(k) ? value_text(m.params[k]) : "");
      auto it = std::find_if(series.begin(), series.end(), [&](const auto& s) { return s.first == name; });
      if (it == series.end()) it = series.insert(series.end(), {name, json::array()});
      const auto x = x_of(m);
      if (!x) continue;
      if (auto p = point(q, *m.run, base, *x)) it->second.push_back(std::move(*p));
    }
    json out = json::array();
    for (auto& [name, points] : series) {
      if (points.empty()) continue;
      std::stable_sort(points.begin(), points.end(),
                       [](const json& a, const json& b) { return a["x"].get<double>() < b["x"].get<double>(); });
      out.push_back(json{{"name", name}, {"color", color(name)}, {"points", std::move(points)}});
    }
    return out;
  }

  void section(int group, const ReportGroup& g) {
    const std::vector<Family> fams = families(g);
    const std::string prefix = slug(g.title);
    // Lines along each numeric axis the families vary.
    std::vector<std::string> axes;
    for (const Family& f : fams)
      if (!f.x.empty() && std::find(axes.begin(), axes.end(), f.x) == axes.end()) axes.push_back(f.x);
    // Within a section, the speedup of the phase its runs time: decode where
    // they decode, else prefill (figures across context lengths show both).
    const bool decodes = g.baseline != nullptr && run_metric(*g.baseline, "decode_tokens_per_s").has_value();
    for (const Quantity& q : quantities()) {
      if (q.kind == Kind::Speed && (std::string(q.key) == "decode-speedup") != decodes) continue;
      const std::optional<json> ref = reference(q, g.baseline);
      for (const std::string& axis : axes) {
        json fig = line_figure(group, fmt::format("{}-{}-vs-{}", prefix, q.key, slug(axis)),
                               fmt::format("{} vs {} — task {}", q.title, axis, g.title), axis, q);
        std::vector<double> xs;
        for (const Family& f : fams) {
          if (f.x != axis) continue;
          for (json& s : family_series(f, q, g.baseline, [&](const MethodRun& m) { return numeric(m.params[f.x]); }))
            fig["series"].push_back(std::move(s));
          if (!f.along.empty())
            fig["notes"].push_back(fmt::format("{}: {} varies with {}", f.name, fmt::join(f.along, ", "), axis));
          for (const MethodRun& m : f.runs) xs.push_back(*numeric(m.params[f.x]));
        }
        fig["x_log"] = x_log(xs);
        add(std::move(fig), q, ref);
      }
      keys_read_figure(group, g, fams, q, ref, prefix);
      bar_figure(group, g, fams, q, ref, prefix);
    }
  }

  // Every method against the keys it read per decode step, when some read fewer than dense.
  void keys_read_figure(int group, const ReportGroup& g, const std::vector<Family>& fams, const Quantity& q,
                        const std::optional<json>& ref, const std::string& prefix) {
    if (q.kind == Kind::Speed || g.baseline == nullptr) return;
    const auto dense_keys = run_metric(*g.baseline, "keys_read_per_step");
    if (!dense_keys || *dense_keys <= 0) return;
    // Only where reading fewer keys is what the methods do (most of them read fewer than dense).
    size_t fewer = 0, methods = 0;
    for (const StoredRun* run : g.runs) {
      if (run == g.baseline) continue;
      ++methods;
      if (const auto k = run_metric(*run, "keys_read_per_step")) fewer += *k < 0.98 * *dense_keys;
    }
    if (2 * fewer <= methods) return;
    json fig = line_figure(group, fmt::format("{}-{}-vs-keys-read", prefix, q.key),
                           fmt::format("{} vs keys read per decode step — task {}", q.title, g.title),
                           "keys read per decode step (per layer and KV head)", q);
    fig["points_suffice"] = true;
    std::vector<double> xs{*dense_keys};
    const auto keys_of = [](const MethodRun& m) { return run_metric(*m.run, "keys_read_per_step"); };
    for (const Family& f : fams) {
      if (f.x.empty()) {  // no axis of its own: each run a point
        for (const MethodRun& m : f.runs) {
          const auto x = keys_of(m);
          const auto p = x ? point(q, *m.run, g.baseline, *x) : std::nullopt;
          if (!p) continue;
          xs.push_back(*x);
          const std::string name = one_line_label(m.run->label);
          fig["series"].push_back(json{{"name", name}, {"color", color(name)}, {"points", json::array({*p})}});
        }
        continue;
      }
      for (json& s : family_series(f, q, g.baseline, keys_of)) {
        for (const json& p : s["points"]) xs.push_back(p["x"].get<double>());
        fig["series"].push_back(std::move(s));
      }
    }
    if (ref) fig["notes"].push_back(fmt::format("dense reads {} keys per step", format_real(*dense_keys)));
    fig["x_log"] = x_log(xs);
    add(std::move(fig), q, ref);
  }

  static std::string one_line_label(std::string s) {
    std::replace(s.begin(), s.end(), '\n', ' ');
    return s;
  }

  // Methods without a numeric axis, one bar per run.
  void bar_figure(int group, const ReportGroup& g, const std::vector<Family>& fams, const Quantity& q,
                  const std::optional<json>& ref, const std::string& prefix) {
    json bars = json::array();
    for (const Family& f : fams) {
      if (!f.x.empty()) continue;
      for (const MethodRun& m : f.runs) {
        const auto p = point(q, *m.run, g.baseline, 0);
        if (!p) continue;
        json bar = {{"label", one_line_label(m.run->label)}, {"color", color(f.name)}, {"y", (*p)["y"]}};
        if (p->contains("lo")) bar["lo"] = (*p)["lo"], bar["hi"] = (*p)["hi"];
        bars.push_back(std::move(bar));
      }
    }
    if (bars.empty()) return;
    json fig = {{"id", fmt::format("{}-{}-by-method", prefix, q.key)},
                {"group", group},
                {"kind", "bar"},
                {"title", fmt::format("{} — task {}", q.title, g.title)},
                {"x_label", ""},
                {"y_label", q.label},
                {"x_log", false},
                {"bars", std::move(bars)},
                {"notes", json::array()}};
    add(std::move(fig), q, ref);
  }

  // Sections of one task that differ only in their context length: each
  // method (by label) against the length, each point against its own section's dense.
  void context_lengths() {
    static const char* const kLengthKeys[] = {"length", "prompt_tokens", "lengths"};
    std::set<std::string> backends;
    for (const ReportGroup& g : data_.groups) backends.insert(g.backend);
    for (const char* key : kLengthKeys) {
      // Partitions: same task (and backend), same parameters but the length.
      std::vector<std::vector<const ReportGroup*>> parts;
      std::vector<std::string> part_keys;
      for (const ReportGroup& g : data_.groups) {
        if (!g.params.is_object() || !g.params.contains(key) || !numeric(g.params[key])) continue;
        json rest = g.params;
        rest.erase(key);
        const std::string part = g.task + '\n' + (backends.size() > 1 ? g.backend : "") + '\n' + rest.dump();
        const auto it = std::find(part_keys.begin(), part_keys.end(), part);
        if (it == part_keys.end()) {
          part_keys.push_back(part);
          parts.push_back({&g});
        } else {
          parts[size_t(it - part_keys.begin())].push_back(&g);
        }
      }
      for (size_t p = 0; p < parts.size(); ++p) {
        const auto& groups = parts[p];
        std::set<double> lengths;
        for (const ReportGroup* g : groups) lengths.insert(*numeric(g->params[key]));
        if (lengths.size() < 2) continue;
        std::string task = groups.front()->task;
        if (backends.size() > 1) task += " (" + groups.front()->backend + ")";
        std::string id = slug(task);
        if (parts.size() > 1) id += fmt::format("-{}", p + 1);
        for (const Quantity& q : quantities()) context_figure(groups, key, task, id, q);
      }
    }
  }

  void context_figure(const std::vector<const ReportGroup*>& groups, const char* key, const std::string& task,
                      const std::string& id, const Quantity& q) {
    json fig = line_figure(-1, fmt::format("{}-{}-vs-{}", id, q.key, slug(key)),
                           fmt::format("{} vs context length — task {}", q.title, task),
                           fmt::format("context length (tokens; {})", key), q);
    std::vector<std::pair<std::string, json>> series;
    std::vector<double> xs;
    json dense = json::array();
    for (const ReportGroup* g : groups) {
      const double x = *numeric(g->params[key]);
      xs.push_back(x);
      for (const StoredRun* run : g->runs) {
        if (run == g->baseline) {
          // Dense's own values vary with the length: a line of its own, unless a speedup (1).
          if (q.kind != Kind::Speed)
            if (auto pt = point(q, *run, g->baseline, x)) dense.push_back(std::move(*pt));
          continue;
        }
        const auto pt = point(q, *run, g->baseline, x);
        if (!pt) continue;
        const std::string name = one_line_label(run->label);
        auto it = std::find_if(series.begin(), series.end(), [&](const auto& s) { return s.first == name; });
        if (it == series.end()) it = series.insert(series.end(), {name, json::array()});
        it->second.push_back(*pt);
      }
    }
    const auto by_x = [](const json& a, const json& b) { return a["x"].get<double>() < b["x"].get<double>(); };
    std::optional<json> ref;
    if (q.kind == Kind::Speed) {
      ref = json{{"name", "dense"}, {"y", 1.0}};
    } else if (dense.size() >= 2) {
      std::stable_sort(dense.begin(), dense.end(), by_x);
      fig["series"].push_back(json{{"name", "dense"}, {"color", -1}, {"points", std::move(dense)}});
    }
    for (auto& [name, points] : series) {
      std::stable_sort(points.begin(), points.end(), by_x);
      fig["series"].push_back(json{{"name", name}, {"color", color(name)}, {"points", std::move(points)}});
    }
    fig["x_log"] = x_log(xs);
    add(std::move(fig), q, ref);
  }

  const ReportData& data_;
  json figures_ = json::array();
  std::map<std::string, int> colors_;
  std::set<std::string> ids_;
};

}  // namespace

json figure_specs(const ReportData& data) { return Builder(data).build(); }

}  // namespace inferlab
