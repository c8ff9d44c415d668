// A LoRA adapter as the engine takes it, from either format it reads: a PEFT
// folder (adapter_config.json + adapter_model.safetensors) or a llama.cpp GGUF
// adapter, checked against the model and with every adapter's rows in the
// model's own order (the q/k rows permuted as the model's conversion permuted
// them). Used by a method's WeightEditor::load_adapter and by a model that
// merges an adapter at load ([model] adapter).
#pragma once

#include <string>
#include <vector>

#include "formats/peft_adapter.h"
#include "inferlab/result.h"
#include "model/model_config.h"

namespace inferlab {

Result<std::vector<peft::ProjectionAdapter>> read_lora_adapter(const std::string& path, const ModelConfig& config);

}  // namespace inferlab
