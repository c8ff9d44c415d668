#include "formats/json_file.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace inferlab {

Result<nlohmann::json> read_json_object(const std::filesystem::path& path) {
  using nlohmann::json;
  const std::string name = path.string();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Error{name + ": no such file"};
  if (!std::filesystem::is_regular_file(path, ec)) return Error{name + ": not a regular file"};
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{name + ": cannot be read (" + std::strerror(errno) + ")"};
  std::ostringstream text;
  text << in.rdbuf();
  json parsed;
  try {
    parsed = json::parse(text.str());
  } catch (const json::parse_error& e) {
    return Error{name + ": malformed JSON at byte " + std::to_string(e.byte) + " (" + e.what() + ")"};
  } catch (const json::exception& e) {
    return Error{name + ": malformed JSON (" + e.what() + ")"};
  }
  if (!parsed.is_object()) return Error{name + ": is not a JSON object"};
  return parsed;
}

}  // namespace inferlab
