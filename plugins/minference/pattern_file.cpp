#include "pattern_file.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace inferlab::minference {

namespace {

using json = nlohmann::json;

// "line L, column C" of a byte offset (1-based, as nlohmann reports it).
std::string position_of(std::string_view text, size_t byte) {
  size_t line = 1, column = 1;
  for (size_t i = 0; i + 1 < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

// A budget: a non-negative whole number (the reference writes ints; 1000.0 is accepted).
bool whole(const json& v, int64_t& out) {
  if (v.is_number_integer()) {
    out = v.get<int64_t>();
    return out >= 0;
  }
  if (!v.is_number_float()) return false;
  const double d = v.get<double>();
  if (!(d >= 0.0) || d > 1e15 || std::floor(d) != d) return false;
  out = int64_t(d);
  return true;
}

}  // namespace

const char* head_type_name(HeadType type) {
  switch (type) {
    case HeadType::VerticalSlash: return "vertical_and_slash";
    case HeadType::StreamLlm: return "stream_llm";
    case HeadType::BlockSparse: return "block_sparse";
  }
  return "?";
}

Result<PatternFile> parse_pattern_file(std::string_view text, const std::string& name, int32_t n_layers,
                                       int32_t n_heads) {
  json doc;
  try {
    doc = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return Error{name + ": not valid JSON at " + position_of(text, e.byte) + " (" + e.what() + ")"};
  } catch (const json::exception& e) {  // e.g. a number too large for a double (out_of_range 406)
    return Error{name + ": not valid JSON (" + std::string(e.what()) + ")"};
  }
  if (!doc.is_array())
    return Error{name + ": expected a JSON list with one object per layer (MInference's pattern file layout)"};
  if (n_layers > 0 && int64_t(doc.size()) != n_layers)
    return Error{name + ": " + std::to_string(doc.size()) + " layers, but the model has " + std::to_string(n_layers) +
                 " (a pattern file belongs to one model)"};
  PatternFile file;
  for (size_t l = 0; l < doc.size(); ++l) {
    const json& layer = doc[l];
    const std::string where = name + ": layer " + std::to_string(l);
    if (!layer.is_object()) return Error{where + ": expected an object of heads {\"0\": [type, a, b, score], ...}"};
    const int64_t heads = n_heads > 0 ? n_heads : int64_t(layer.size());
    if (int64_t(layer.size()) != heads)
      return Error{where + ": " + std::to_string(layer.size()) + " heads, but the model has " + std::to_string(heads) +
                   " query heads"};
    std::vector<HeadPattern> row(static_cast<size_t>(heads));
    std::vector<bool> seen(static_cast<size_t>(heads), false);
    for (const auto& [key, value] : layer.items()) {
      const std::string at = where + ", head \"" + key + "\"";
      int64_t h = -1;
      if (!key.empty() && key.size() <= 9 && key.find_first_not_of("0123456789") == std::string::npos)
        h = std::stoll(key);
      if (h < 0 || h >= heads)
        return Error{at + ": a head key must be a query head index 0.." + std::to_string(heads - 1)};
      if (seen[size_t(h)]) return Error{at + ": the head appears twice"};
      seen[size_t(h)] = true;
      if (!value.is_array() || value.size() < 3 || value.size() > 4 || !value[0].is_string())
        return Error{at + ": expected [type, a, b, score]"};
      HeadPattern& p = row[size_t(h)];
      const std::string type = value[0].get<std::string>();
      if (type == "vertical_and_slash") p.type = HeadType::VerticalSlash;
      else if (type == "stream_llm") p.type = HeadType::StreamLlm;
      else if (type == "block_sparse") p.type = HeadType::BlockSparse;
      else return Error{at + ": unknown type \"" + type + "\" (vertical_and_slash, stream_llm or block_sparse)"};
      if (!whole(value[1], p.a) || !whole(value[2], p.b))
        return Error{at + ": the budgets a and b must be whole numbers >= 0"};
      if (value.size() == 4) {
        if (!value[3].is_number()) return Error{at + ": the score must be a number"};
        p.score = value[3].get<double>();
      }
    }
    file.layers.push_back(std::move(row));
  }
  return file;
}

Result<PatternFile> read_pattern_file(const std::string& path, int32_t n_layers, int32_t n_heads) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{path + ": cannot open the pattern file"};
  std::stringstream text;
  text << in.rdbuf();
  return parse_pattern_file(text.str(), path, n_layers, n_heads);
}

std::string format_pattern_file(const PatternFile& file) {
  std::string out = "[";
  for (size_t l = 0; l < file.layers.size(); ++l) {
    out += l == 0 ? "{" : ", {";
    for (size_t h = 0; h < file.layers[l].size(); ++h) {
      const HeadPattern& p = file.layers[l][h];
      // Python's json.dump spacing, as the reference's files have it.
      out += (h == 0 ? "\"" : ", \"") + std::to_string(h) + "\": [\"" + head_type_name(p.type) + "\", " +
             std::to_string(p.a) + ", " + std::to_string(p.b) + ", " + json(p.score).dump() + "]";
    }
    out += "}";
  }
  return out + "]\n";
}

Status write_pattern_file(const std::string& path, const PatternFile& file) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return Error{path + ": cannot write the pattern file"};
    out << format_pattern_file(file);
    if (!out.flush()) return Error{path + ": writing the pattern file failed (disk full?)"};
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return Error{path + ": cannot move the pattern file into place"};
  return ok_status();
}

}  // namespace inferlab::minference
