// libFuzzer target: arbitrary bytes through the MInference pattern-file reader
// (plugins/minference/pattern_file.h), with and without a required shape. A
// file it accepts must format and parse back to the same patterns.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "pattern_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace inferlab::minference;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (const auto& [layers, heads] : {std::pair{0, 0}, std::pair{2, 4}}) {
    auto file = parse_pattern_file(text, "fuzz.json", layers, heads);
    if (!file.ok()) {
      if (file.message().rfind("fuzz.json", 0) != 0) std::abort();  // every message names the file
      continue;
    }
    auto again = parse_pattern_file(format_pattern_file(*file), "again.json", layers, heads);
    if (!again.ok() || again->layers.size() != file->layers.size()) std::abort();
    for (size_t l = 0; l < file->layers.size(); ++l) {
      if (again->layers[l].size() != file->layers[l].size()) std::abort();
      for (size_t h = 0; h < file->layers[l].size(); ++h) {
        const HeadPattern &a = file->layers[l][h], &b = again->layers[l][h];
        if (a.type != b.type || a.a != b.a || a.b != b.b || (a.score != b.score && a.score == a.score)) std::abort();
      }
    }
  }
  return 0;
}
