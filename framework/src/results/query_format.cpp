// Output formats of `inferlab query`: an aligned table for reading, CSV and
// JSON for other tools.
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>

#include "results/database.h"

namespace inferlab {

namespace {

// JSON's number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
// Stricter than strtod on purpose: "007", "0x1f", " 1" and "inf" stay text.
bool is_json_number(std::string_view s) {
  size_t i = 0;
  const auto digits = [&] {
    const size_t start = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    return i > start;
  };
  if (i < s.size() && s[i] == '-') ++i;
  if (i < s.size() && s[i] == '0') {
    ++i;
  } else if (!digits()) {
    return false;
  }
  if (i < s.size() && s[i] == '.' && (++i, !digits())) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (!digits()) return false;
  }
  return i == s.size();
}

// A query value as JSON: integers that fit int64 and finite reals become
// numbers, everything else (NULL aside) a string.
nlohmann::ordered_json json_value(const std::optional<std::string>& v) {
  if (!v) return nullptr;
  if (!is_json_number(*v)) return *v;
  int64_t integer = 0;
  const char* end = v->data() + v->size();
  if (auto [ptr, ec] = std::from_chars(v->data(), end, integer); ec == std::errc() && ptr == end) return integer;
  if (v->find_first_of(".eE") == std::string::npos) return *v;  // too large for int64: keep every digit
  const double real = std::strtod(v->c_str(), nullptr);
  if (std::isfinite(real)) return real;
  return *v;
}

// Cells of the aligned table sit on one line.
std::string one_line(const std::optional<std::string>& v) {
  if (!v) return "";
  std::string s = *v;
  for (char& ch : s)
    if (ch == '\n' || ch == '\r' || ch == '\t') ch = ' ';
  return s;
}

std::string pad(const std::string& text, size_t width, bool right) {
  const size_t fill = width > display_width(text) ? width - display_width(text) : 0;
  return right ? std::string(fill, ' ') + text : text + std::string(fill, ' ');
}

std::string csv_field(const std::optional<std::string>& v) {
  if (!v) return "";
  if (v->empty()) return "\"\"";  // tells an empty string from NULL
  if (v->find_first_of(",\"\r\n") == std::string::npos) return *v;
  std::string quoted = "\"";
  for (char ch : *v) {
    if (ch == '"') quoted += '"';
    quoted += ch;
  }
  return quoted + '"';
}

const std::optional<std::string>& cell(const std::vector<std::optional<std::string>>& row, size_t i) {
  static const std::optional<std::string> missing;
  return i < row.size() ? row[i] : missing;
}

}  // namespace

size_t display_width(std::string_view text) {
  size_t n = 0;
  for (unsigned char ch : text) n += (ch & 0xC0) != 0x80;  // count lead bytes only
  return n;
}

std::string format_real(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  const double magnitude = std::fabs(v);
  if (magnitude < 1e15 && std::nearbyint(v) == v) return fmt::format("{}", int64_t(v));
  if (magnitude >= 1e6 && magnitude < 1e15) {
    // Large values with a fraction are timestamps and byte counts: keep them
    // readable to the millisecond instead of switching to an exponent.
    std::string s = fmt::format("{:.3f}", v);
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
    return s;
  }
  return fmt::format("{:.6g}", v);
}

std::string format_table(const QueryResult& result) {
  const size_t n = result.columns.size();
  if (n == 0) return "";
  std::vector<size_t> width(n);
  std::vector<bool> numeric(n, true), any(n, false);
  for (size_t i = 0; i < n; ++i) width[i] = display_width(result.columns[i]);
  for (const auto& row : result.rows)
    for (size_t i = 0; i < n; ++i) {
      const auto& v = cell(row, i);
      width[i] = std::max(width[i], display_width(one_line(v)));
      if (!v) continue;
      any[i] = true;
      if (!is_json_number(*v)) numeric[i] = false;
    }
  const auto line = [&](auto&& text_of) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += (i ? "  " : "") + pad(text_of(i), width[i], numeric[i] && any[i]);
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s + '\n';
  };
  std::string out = line([&](size_t i) { return result.columns[i]; });
  out += line([&](size_t i) { return std::string(width[i], '-'); });
  for (const auto& row : result.rows) out += line([&](size_t i) { return one_line(cell(row, i)); });
  return out;
}

// Records end in "\n" rather than RFC 4180's CRLF: the output goes to Unix tools
// and every CSV reader accepts both.
std::string format_csv(const QueryResult& result) {
  if (result.columns.empty()) return "";
  std::string out;
  const auto record = [&](size_t n, auto&& field) {
    for (size_t i = 0; i < n; ++i) out += (i ? "," : "") + field(i);
    out += '\n';
  };
  record(result.columns.size(), [&](size_t i) { return csv_field(result.columns[i]); });
  for (const auto& row : result.rows) record(result.columns.size(), [&](size_t i) { return csv_field(cell(row, i)); });
  return out;
}

std::string format_json(const QueryResult& result) {
  // Repeated column names (SELECT a.x, b.x) get a suffix instead of overwriting each other.
  std::vector<std::string> keys;
  for (const auto& column : result.columns) {
    std::string key = column;
    for (int k = 2; std::find(keys.begin(), keys.end(), key) != keys.end(); ++k) key = fmt::format("{}_{}", column, k);
    keys.push_back(key);
  }
  auto array = nlohmann::ordered_json::array();
  for (const auto& row : result.rows) {
    nlohmann::ordered_json object = nlohmann::ordered_json::object();
    for (size_t i = 0; i < keys.size(); ++i) object[keys[i]] = json_value(cell(row, i));
    array.push_back(std::move(object));
  }
  return array.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

}  // namespace inferlab
