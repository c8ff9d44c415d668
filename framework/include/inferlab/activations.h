// Reading an activation store (CalibrationRequest::stored): the intermediates
// of dense passes over calibration windows, written by the host layer by layer
// and read here by a plugin, header-only (a plugin does not link the host).
//
// A store is a folder:
//   manifest.txt           text, one "key value" a line: the format and version
//                          ("inferlab-activations 1"), model checksum,
//                          arithmetic, corpus, samples, tokens (per sample),
//                          n_layers, one "tap NAME WIDTH" line per tap, and
//                          committed (samples complete; rewritten atomically
//                          after each sample)
//   tokens.i32             the token id of every row (int32)
//   NAME.LLL.f32           one file per (tap, layer): float32 rows (rows, width)
// Every data file starts with a 32-byte header (ActivationFileHeader), then
// row r of sample s = r / tokens at position r % tokens. Little-endian.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/plugin.h"
#include "inferlab/result.h"

namespace inferlab {

inline constexpr int32_t kActivationStoreVersion = 1;
inline constexpr const char* kActivationManifest = "manifest.txt";
// The taps a store can hold: every one but kTapLogits.
inline constexpr uint32_t kStorableTaps = kTapHiddenIn | kTapQueries | kTapKeys | kTapAttentionOut |
                                          kTapFfnActivation | kTapValues | kTapAttentionIn | kTapFfnIn | kTapFfnGate |
                                          kTapHiddenOut;

// A tap's name ("hidden_in", "attention_in", "queries", "keys", "values",
// "attention_out", "ffn_in", "ffn_gate", "ffn_activation", "hidden_out",
// "logits"); nullptr
// for a bit that names none.
inline const char* tap_name(uint32_t tap) {
  switch (tap) {
    case kTapHiddenIn: return "hidden_in";
    case kTapQueries: return "queries";
    case kTapKeys: return "keys";
    case kTapAttentionOut: return "attention_out";
    case kTapFfnActivation: return "ffn_activation";
    case kTapLogits: return "logits";
    case kTapValues: return "values";
    case kTapAttentionIn: return "attention_in";
    case kTapFfnIn: return "ffn_in";
    case kTapFfnGate: return "ffn_gate";
    case kTapHiddenOut: return "hidden_out";
    default: return nullptr;
  }
}
// The bit a name stands for (0: none).
inline uint32_t tap_from_name(std::string_view name) {
  for (uint32_t bit = 1; bit != 0 && bit <= kTapHiddenOut; bit <<= 1)
    if (const char* n = tap_name(bit); n != nullptr && name == n) return bit;
  return 0;
}
// The bits of `taps`, lowest first.
inline std::vector<uint32_t> tap_bits(uint32_t taps) {
  std::vector<uint32_t> out;
  for (uint32_t bit = 1; bit != 0; bit <<= 1)
    if (taps & bit) out.push_back(bit);
  return out;
}

// The head of every data file.
struct ActivationFileHeader {
  char magic[8] = {'I', 'L', 'A', 'C', 'T', 'I', 'V', '\0'};
  uint32_t version = kActivationStoreVersion;
  uint32_t tap = 0;     // a CalibrationTap bit; 0: the token ids
  int32_t layer = -1;   // -1: the token ids
  int32_t width = 1;    // values per row
  uint32_t value_bytes = 4;
  uint32_t reserved = 0;
};
static_assert(sizeof(ActivationFileHeader) == 32);

// A data file's name in its store: "hidden_in.003.f32", or "tokens.i32".
inline std::string activation_file_name(uint32_t tap, int32_t layer) {
  if (tap == 0) return "tokens.i32";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s.%03d.f32", tap_name(tap) ? tap_name(tap) : "unknown", int(layer));
  return buf;
}

// What manifest.txt says.
struct ActivationManifest {
  std::string model_checksum, arithmetic, corpus;
  int32_t samples = 0, tokens = 0, n_layers = 0, committed = 0;
  std::map<uint32_t, int32_t> widths;  // tap bit -> values per row

  uint32_t taps() const {
    uint32_t t = 0;
    for (const auto& [bit, w] : widths) t |= bit;
    return t;
  }
  std::string text() const {
    std::ostringstream o;
    auto line = [](std::string s) {  // a value is the rest of its line
      for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
      return s;
    };
    o << "inferlab-activations " << kActivationStoreVersion << "\nmodel_checksum " << line(model_checksum)
      << "\narithmetic " << line(arithmetic) << "\ncorpus " << line(corpus) << "\nsamples " << samples
      << "\ntokens " << tokens << "\nn_layers " << n_layers << "\n";
    for (const auto& [bit, w] : widths) o << "tap " << tap_name(bit) << " " << w << "\n";
    o << "committed " << committed << "\n";
    return o.str();
  }
  static Result<ActivationManifest> read(const std::filesystem::path& path) {
    const std::string name = path.string();
    std::ifstream in(path, std::ios::binary);
    if (!in) return Error{name + ": no activation store manifest here (missing or unreadable)"};
    std::string line;
    if (!std::getline(in, line) || line.rfind("inferlab-activations ", 0) != 0)
      return Error{name + ": not an activation store manifest (bad magic)"};
    if (line != "inferlab-activations " + std::to_string(kActivationStoreVersion))
      return Error{name + ": activation store " + line.substr(21) + ", this reader reads version " +
                   std::to_string(kActivationStoreVersion)};
    ActivationManifest m;
    std::map<std::string, int> seen;
    auto number = [](const std::string& v, int32_t& out) {
      char* end = nullptr;
      const long x = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || x < 0 || x > INT32_MAX) return false;
      out = int32_t(x);
      return true;
    };
    for (int n = 2; std::getline(in, line); ++n) {
      if (line.empty()) continue;
      const size_t sp = line.find(' ');
      const std::string key = line.substr(0, sp), value = sp == std::string::npos ? "" : line.substr(sp + 1);
      const std::string where = name + ":" + std::to_string(n) + ": ";
      bool ok = true;
      if (key == "model_checksum") m.model_checksum = value;
      else if (key == "arithmetic") m.arithmetic = value;
      else if (key == "corpus") m.corpus = value;
      else if (key == "samples") ok = number(value, m.samples);
      else if (key == "tokens") ok = number(value, m.tokens);
      else if (key == "n_layers") ok = number(value, m.n_layers);
      else if (key == "committed") ok = number(value, m.committed);
      else if (key == "tap") {
        const size_t sp2 = value.find(' ');
        const uint32_t bit = tap_from_name(value.substr(0, sp2));
        int32_t width = 0;
        if ((bit & kStorableTaps) == 0 || sp2 == std::string::npos || !number(value.substr(sp2 + 1), width) ||
            width <= 0)
          return Error{where + "bad tap line '" + line + "'"};
        m.widths[bit] = width;
      } else {
        return Error{where + "unknown key '" + key + "'"};
      }
      if (!ok) return Error{where + "bad value of " + key + ": '" + value + "'"};
      ++seen[key];
    }
    for (const char* key : {"samples", "tokens", "n_layers", "committed"})
      if (seen[key] != 1) return Error{name + ": " + key + " missing or repeated"};
    if (m.widths.empty()) return Error{name + ": no tap"};
    if (m.committed > m.samples || m.tokens < 1 || m.n_layers < 1)
      return Error{name + ": inconsistent (" + std::to_string(m.committed) + " of " + std::to_string(m.samples) +
                   " samples committed, " + std::to_string(m.tokens) + " tokens, " + std::to_string(m.n_layers) +
                   " layers)"};
    return m;
  }
};

// Checks a data file's header against (tap, layer, width) and its size against
// `rows` (exactly, or at least when `at_least`); errors name the file.
inline Status check_activation_file(const std::filesystem::path& path, uint32_t tap, int32_t layer, int32_t width,
                                    int64_t rows, bool at_least = false) {
  const std::string name = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{name + ": activation store file missing or unreadable"};
  ActivationFileHeader h, want;
  if (!in.read(reinterpret_cast<char*>(&h), sizeof h) || std::memcmp(h.magic, want.magic, sizeof h.magic) != 0)
    return Error{name + ": not an activation store file (bad magic)"};
  if (h.version != uint32_t(kActivationStoreVersion))
    return Error{name + ": activation file version " + std::to_string(h.version) + ", this reader reads " +
                 std::to_string(kActivationStoreVersion)};
  if (h.tap != tap || h.layer != layer || h.width != width || h.value_bytes != 4)
    return Error{name + ": header says tap " + std::to_string(h.tap) + " layer " + std::to_string(h.layer) +
                 " width " + std::to_string(h.width) + ", the manifest " + std::to_string(tap) + " " +
                 std::to_string(layer) + " " + std::to_string(width)};
  std::error_code ec;
  const auto size = int64_t(std::filesystem::file_size(path, ec));
  const int64_t expect = int64_t(sizeof h) + rows * int64_t(width) * 4;
  if (ec || size < expect || (!at_least && size != expect))
    return Error{name + ": " + std::to_string(ec ? 0 : size) + " bytes, its manifest says " + std::to_string(expect) +
                 (size < expect ? " (truncated)" : "")};
  return ok_status();
}

// A complete store, read at random (a trainer streams mini-batches of rows).
class ActivationStore {
 public:
  static Result<ActivationStore> open(const std::filesystem::path& dir) {
    auto m = ActivationManifest::read(dir / kActivationManifest);
    if (!m) return m.error();
    if (m->committed < m->samples)
      return Error{dir.string() + ": incomplete activation store: " + std::to_string(m->committed) + " of " +
                   std::to_string(m->samples) + " samples captured"};
    ActivationStore s;
    s.dir_ = dir;
    s.m_ = std::move(*m);
    if (auto st = check_activation_file(dir / activation_file_name(0, -1), 0, -1, 1, s.rows()); !st) return st.error();
    for (const auto& [bit, w] : s.m_.widths)
      for (int32_t l = 0; l < s.m_.n_layers; ++l)
        if (auto st = check_activation_file(s.file(bit, l), bit, l, w, s.rows()); !st) return st.error();
    return s;
  }

  const std::filesystem::path& dir() const { return dir_; }
  uint32_t taps() const { return m_.taps(); }
  bool has(uint32_t tap) const { return m_.widths.count(tap) != 0; }
  int32_t n_layers() const { return m_.n_layers; }
  int32_t samples() const { return m_.samples; }
  int32_t tokens_per_sample() const { return m_.tokens; }
  int64_t rows() const { return int64_t(m_.committed) * m_.tokens; }  // tokens stored
  int32_t width(uint32_t tap) const { return has(tap) ? m_.widths.at(tap) : 0; }
  const ActivationManifest& manifest() const { return m_; }
  std::filesystem::path file(uint32_t tap, int32_t layer) const { return dir_ / activation_file_name(tap, layer); }
  // Bytes of every data file.
  int64_t bytes() const {
    int64_t b = int64_t(sizeof(ActivationFileHeader)) + rows() * 4;
    for (const auto& [bit, w] : m_.widths) b += m_.n_layers * (int64_t(sizeof(ActivationFileHeader)) + rows() * w * 4);
    return b;
  }

  // Rows [row_begin, row_begin + n_rows) of (tap, layer) into `out`, (n_rows, width(tap)).
  Status read(uint32_t tap, int32_t layer, int64_t row_begin, int64_t n_rows, std::vector<float>& out) const {
    const char* name = tap_name(tap);
    if (!has(tap)) return Error{dir_.string() + ": the store holds no tap " + (name ? name : std::to_string(tap))};
    if (layer < 0 || layer >= m_.n_layers)
      return Error{dir_.string() + ": layer " + std::to_string(layer) + " of " + std::to_string(m_.n_layers)};
    out.resize(size_t(std::max<int64_t>(n_rows, 0) * width(tap)));
    return read_rows(file(tap, layer), width(tap), row_begin, n_rows, out.data());
  }
  // The token ids of rows [row_begin, row_begin + n_rows).
  Status read_tokens(int64_t row_begin, int64_t n_rows, std::vector<int32_t>& out) const {
    out.resize(size_t(std::max<int64_t>(n_rows, 0)));
    return read_rows(dir_ / activation_file_name(0, -1), 1, row_begin, n_rows, out.data());
  }

 private:
  Status read_rows(const std::filesystem::path& path, int32_t width, int64_t row_begin, int64_t n_rows,
                   void* out) const {
    if (row_begin < 0 || n_rows < 0 || row_begin + n_rows > rows())
      return Error{path.string() + ": rows [" + std::to_string(row_begin) + ", " + std::to_string(row_begin + n_rows) +
                   ") of " + std::to_string(rows())};
    std::ifstream in(path, std::ios::binary);
    const int64_t bytes = n_rows * width * 4;
    if (!in.seekg(std::streamoff(int64_t(sizeof(ActivationFileHeader)) + row_begin * width * 4)) ||
        !in.read(static_cast<char*>(out), std::streamsize(bytes)))
      return Error{path.string() + ": cannot read rows [" + std::to_string(row_begin) + ", " +
                   std::to_string(row_begin + n_rows) + ") (file changed since the store was opened?)"};
    return ok_status();
  }

  std::filesystem::path dir_;
  ActivationManifest m_;
};

}  // namespace inferlab
