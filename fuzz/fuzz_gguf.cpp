// libFuzzer target: a GGUF file as it comes from outside. Parses it, then reads
// what loading a model reads from it (hyper-parameters, tokenizer, small
// tensors), so every check on the way to a loaded model is exercised.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "gguf/gguf.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace inferlab;
  auto file = gguf::File::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.gguf");
  if (!file) return 0;
  (void)read_model_config(**file);
  if (auto tok = Tokenizer::from_gguf(**file); tok) (void)(*tok)->encode("Hello, world! 12345", true, false);
  for (const gguf::TensorInfo& t : (*file)->tensors())
    if (t.n_elems() <= (int64_t(1) << 16)) (void)gguf::dequantize(t);
  return 0;
}
