// Training examples for fine-tuning: token sequences with the positions whose
// token the loss asks the model to predict. From plain text (cut into windows,
// every token predicted), JSONL (prompt/response: loss on the response and the
// end-of-sequence token only; or text), or a task of datasets/ (its prompt,
// then its answer with the loss).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "experiment/config.h"
#include "finetune/lora_graph.h"
#include "inferlab/result.h"
#include "tokenizer/tokenizer.h"

namespace inferlab::finetune {

struct Example {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> predict;  // predict[i]: the loss includes predicting tokens[i] (i >= 1)
};

struct DataSummary {
  int64_t examples = 0;
  int64_t tokens = 0;      // in all examples
  int64_t targets = 0;     // predicted tokens
  int64_t truncated = 0;   // text examples cut to seq_len + 1 tokens
  int64_t dropped = 0;     // prompt/response examples longer than that, left out
};

// The config's data files and task as examples of at most seq_len + 1 tokens
// (seq_len positions of input). Errors name the file and line, or the key.
Result<std::vector<Example>> load_examples(const FinetuneSection& config, const Tokenizer& tokenizer,
                                           int32_t max_context, DataSummary* summary = nullptr);

// Examples as one batch, padded to the longest (token 0, no target there).
Batch make_batch(const std::vector<Example>& examples, const std::vector<int64_t>& which);

}  // namespace inferlab::finetune
