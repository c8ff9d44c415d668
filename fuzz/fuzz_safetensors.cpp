// libFuzzer target: a safetensors file as it comes from outside (a PEFT
// adapter). Parses it, then reads every tensor small enough.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace inferlab;
  auto file = safetensors::File::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.safetensors");
  if (!file) return 0;
  for (const auto& t : file->tensors())
    if (t.n_elems() <= (int64_t(1) << 16)) (void)file->read_f32(t);
  return 0;
}
