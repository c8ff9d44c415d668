// llama.cpp LoRA adapters: a GGUF file with general.type = "adapter",
// adapter.type = "lora", adapter.lora.alpha and, per adapted projection, two
// tensors "<tensor>.weight.lora_a" (ggml dims [in, r]: r rows of `in` values)
// and "<tensor>.weight.lora_b" (dims [r, out]), named like the model's own
// ("blk.N.attn_q", ..., "blk.N.ffn_down", "output"). llama.cpp's converter
// writes lora_b of attn_q and attn_k in GGUF's row order already, so nothing is
// permuted here. The scale is alpha / r (1 when alpha is 0 or absent, as in
// llama.cpp). Errors name the file and the tensor or key.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "formats/peft_adapter.h"
#include "gguf/gguf.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"

namespace inferlab::gguf_adapter {

// True when `path` starts with the GGUF magic.
bool looks_like_gguf(const std::filesystem::path& path);

// The adapters of `path` for a model of `shape` and `architecture` (`tied`:
// the output head shares the embedding, so an output adapter is refused).
Result<std::vector<peft::ProjectionAdapter>> read_adapter(const std::filesystem::path& path, const ModelShape& shape,
                                                          const std::string& architecture, bool tied);
// The same from an opened file (`origin` names it in errors).
Result<std::vector<peft::ProjectionAdapter>> read_adapter(const gguf::File& file, const std::string& origin,
                                                          const ModelShape& shape, const std::string& architecture,
                                                          bool tied);

// Writes adapters (this engine's row order, which is llama.cpp's) as a GGUF
// adapter llama.cpp loads: general.type "adapter", adapter.type "lora",
// general.architecture, one adapter.lora.alpha for all (so every adapter's
// scale * r must be the same: llama.cpp scales by alpha / r and knows no
// rsLoRA), float32 lora_a [in, r] and lora_b [r, out]. Written beside `path`
// and renamed into place.
Status write_adapter(const std::filesystem::path& path, const std::vector<peft::ProjectionAdapter>& adapters,
                     const std::string& architecture);

}  // namespace inferlab::gguf_adapter
