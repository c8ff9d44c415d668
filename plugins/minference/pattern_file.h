// MInference's pattern files, read and written in the reference's own layout
// (the `config` its offline search writes and its models ship with): a JSON
// list with one object per layer; each key is a query head index written as a
// string, each value [type, a, b, score]:
//
//   "vertical_and_slash"  a = vertical columns kept, b = slash diagonals kept
//   "stream_llm"          a = first tokens kept (n_init), b = local window (n_local)
//   "block_sparse"        a, b are not read by the reference's kernel (it always
//                         keeps the top 100 key blocks of 64 per query block);
//                         kept as they are, so a file round-trips
//
// score is what the search measured for the head's pattern (its attention
// recall), informational. A file whose layers or heads do not match the model,
// an unknown type, a negative budget or malformed JSON is refused with the
// file name and the layer, head or line at fault.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/result.h"

namespace inferlab::minference {

enum class HeadType : int32_t { VerticalSlash = 0, StreamLlm = 1, BlockSparse = 2 };
const char* head_type_name(HeadType type);  // the file's spelling

struct HeadPattern {
  HeadType type = HeadType::VerticalSlash;
  int64_t a = 0, b = 0;
  double score = 0.0;
};

struct PatternFile {
  std::vector<std::vector<HeadPattern>> layers;  // [layer][query head]
};

// Parses a file's text; `name` is used in messages. n_layers / n_heads > 0
// require that shape.
Result<PatternFile> parse_pattern_file(std::string_view text, const std::string& name, int32_t n_layers,
                                       int32_t n_heads);
Result<PatternFile> read_pattern_file(const std::string& path, int32_t n_layers, int32_t n_heads);
// The reference's layout: one line per layer, heads in index order.
std::string format_pattern_file(const PatternFile& file);
Status write_pattern_file(const std::string& path, const PatternFile& file);

}  // namespace inferlab::minference
