// `inferlab finetune`: LoRA or QLoRA fine-tuning of the config's model on its
// data, with the shared trainer's AdamW, schedules, clipping and seeded data
// order (inferlab/train.h), gradient accumulation, resumable checkpoints
// (parameters, optimizer moments, generator state and data position: a run
// killed and resumed ends with the same adapter, bit for bit, as one that was
// not, for the same thread count), the training curve in the results
// database, and a PEFT adapter folder as its output.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <ostream>
#include <string>

#include "experiment/config.h"
#include "finetune/lora_graph.h"
#include "inferlab/result.h"

namespace inferlab::finetune {

struct FinetuneOptions {
  std::filesystem::path db;          // results database for the curve; empty: none
  std::ostream* progress = nullptr;  // progress lines; null: quiet
  bool restart = false;              // discard a checkpoint left by an earlier run of this config
  // Stop (as an interruption would) after this step's work and checkpoint,
  // without writing the adapter; 0: run to the end. For tests of resumption.
  int64_t stop_after_step = 0;
};

struct FinetuneReport {
  std::string hash;                 // of the resolved config (the checkpoint and database key)
  int64_t first_step = 1;           // > 1 when resumed from a checkpoint
  int64_t steps = 0;                // the last step (the config's steps)
  double final_loss = 0;            // mean token loss of the last step
  std::optional<double> eval_loss_before, eval_loss_after;  // held-out mean loss (with eval_fraction)
  double tokens_per_second = 0;     // input tokens (not padding) per second of this process's steps
  int64_t trainable_parameters = 0;
  MemoryStats memory;               // the graph's base weights and peak activations
  int64_t peak_rss_bytes = 0;       // the process's peak resident memory
  std::string output;               // the adapter folder written (empty when stopped early)
  bool stopped = false;             // stop_after_step ended the run before its last step
};

// Where a run's checkpoint lives: beside its output folder.
std::filesystem::path checkpoint_path(const FinetuneConfig& config);

Result<FinetuneReport> run_finetune(const FinetuneConfig& config, const FinetuneOptions& options);

}  // namespace inferlab::finetune
