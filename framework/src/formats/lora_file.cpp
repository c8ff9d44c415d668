#include "formats/lora_file.h"

#include <fmt/format.h>

#include <filesystem>

#include "formats/gguf_adapter.h"

namespace inferlab {

Result<std::vector<peft::ProjectionAdapter>> read_lora_adapter(const std::string& path, const ModelConfig& c) {
  std::error_code ec;
  const bool folder = std::filesystem::is_directory(path, ec);
  if (!folder && !gguf_adapter::looks_like_gguf(path))
    return Error{fmt::format("{}: expected a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) "
                             "or a llama.cpp GGUF adapter",
                             path)};
  const ModelShape shape{c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_embd, c.n_ff, c.n_vocab, 0, 0};
  auto found = folder ? peft::read_adapter(path, shape, c.tied_embeddings, !c.rope_neox)
                      : gguf_adapter::read_adapter(path, shape, c.architecture, c.tied_embeddings);
  if (!found) return found.error();
  // A llama.cpp adapter for a "llama" model has its q/k rows in the GGUF
  // conversion's permuted order; a checkpoint folder's model keeps Hugging Face's.
  if (!folder && c.rope_neox && c.architecture == "llama")
    for (auto& p : *found)
      if (p.tensor == "attn_q" || p.tensor == "attn_k")
        p.adapter.b = peft::permute_rows_from_gguf(p.adapter.b, p.tensor == "attn_q" ? c.n_heads : c.n_kv_heads,
                                                   c.head_dim, p.adapter.rank);
  return found;
}

}  // namespace inferlab
