// libFuzzer target: the LoRA adapter readers on input from outside. The first
// byte picks the reader: even, a PEFT adapter_config.json's text; odd, a
// llama.cpp GGUF adapter's bytes (parsed, then read into the adapters of a
// small model: 2 layers, 4 heads of 16 over 2 kv heads, width 64, FFN 160,
// tied output). The safetensors half of a PEFT folder: fuzz_safetensors.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "formats/gguf_adapter.h"
#include "formats/peft_adapter.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace inferlab;
  if (size == 0) return 0;
  if (data[0] % 2 == 0) {
    (void)peft::parse_config(std::string(reinterpret_cast<const char*>(data + 1), size - 1), "adapter_config.json");
    return 0;
  }
  auto file = gguf::File::from_bytes(std::vector<uint8_t>(data + 1, data + size), "adapter.gguf");
  if (!file) return 0;
  ModelShape shape;
  shape.n_layers = 2, shape.n_heads = 4, shape.n_kv_heads = 2, shape.head_dim = 16, shape.n_embd = 64,
  shape.n_ff = 160, shape.n_vocab = 300;
  (void)gguf_adapter::read_adapter(**file, "adapter.gguf", shape, "llama", true);
  return 0;
}
