// A JSON object read from a file (configs, tokenizer files, indexes): errors
// name the file, and for malformed text the byte where parsing stopped.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>

#include "inferlab/result.h"

namespace inferlab {

Result<nlohmann::json> read_json_object(const std::filesystem::path& path);

}  // namespace inferlab
