// libFuzzer target: arbitrary text through the byte-level BPE tokenizer (the
// pre-tokenizer's regex, merges, special tokens) and arbitrary ids back to text.
// The first byte picks special-token parsing; encode then decode must give
// the text back when specials are not parsed.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <unistd.h>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "model/synthetic_model.h"
#include "tokenizer/tokenizer.h"

namespace {

std::unique_ptr<inferlab::Tokenizer> make_tokenizer() {
  using namespace inferlab;
  SyntheticModelSpec spec;
  spec.name = "fuzz";
  spec.n_layers = 1;
  spec.n_embd = 8;
  spec.n_ff = 8;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.n_merges = 128;
  const auto path = std::filesystem::temp_directory_path() / ("inferlab-fuzz-tokenizer-" + std::to_string(getpid()) + ".gguf");
  if (!write_synthetic_model(spec, path)) std::abort();
  auto file = gguf::File::open(path);
  std::filesystem::remove(path);
  if (!file) std::abort();
  auto tok = Tokenizer::from_gguf(**file);
  if (!tok) std::abort();
  return std::move(tok).value();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::unique_ptr<inferlab::Tokenizer> tok = make_tokenizer();
  if (size == 0) return 0;
  const bool parse_special = (data[0] & 1) != 0;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  const auto ids = tok->encode(text, false, parse_special);
  const std::string back = tok->decode(ids);
  if (!parse_special && back != text) std::abort();  // byte-level BPE loses nothing
  std::vector<int32_t> arbitrary;
  for (size_t i = 1; i + 1 < size; i += 2) arbitrary.push_back(int32_t(data[i]) << 8 | data[i + 1]);
  (void)tok->decode(arbitrary);
  return 0;
}
