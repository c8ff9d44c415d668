// Task generators: the prompts an experiment runs and how outputs are scored.
// Every task is generated from a seed (synthetic long-context tasks) or cut
// from a corpus file at seeded offsets (perplexity, fidelity), so a run can be
// repeated exactly. The runner feeds `prompt_tokens`; nothing here runs a model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "datasets/task_info.h"
#include "inferlab/result.h"
#include "tokenizer/tokenizer.h"

namespace inferlab {

enum class TaskKind {
  Generation,  // generate max_new_tokens, then score() the decoded text
  Perplexity,  // score every position 1..n-1 of prompt_tokens (mean NLL)
  Fidelity,    // generate max_new_tokens with dense and with the method, compare token by token
  Throughput,  // serve every sample as a request of a continuous batch (experiment/throughput.h)
};

const char* task_kind_name(TaskKind kind);  // "generation", "perplexity", "fidelity", "throughput"

struct TaskSample {
  std::string id;                      // stable within a task, e.g. "len512-depth0.25-s3"
  std::vector<int32_t> prompt_tokens;  // starts with BOS when the tokenizer adds one
  std::vector<std::string> expected;   // Generation: answers that must all appear in the output
  int32_t max_new_tokens = 0;          // Generation and Fidelity: tokens to generate
  // Always empty: a Perplexity sample scores all of prompt_tokens (positions
  // 1..n-1, each predicted from the tokens before it).
  std::vector<int32_t> target_tokens;
  std::map<std::string, double> tags;  // per-sample attributes for reports: context_tokens, depth, ...
  // Generation, question = "decode": the last question_tokens prompt tokens (the
  // question) are fed one decode step at a time through the method, after the
  // context before them was prefilled (Quest's passkey protocol). 0: all prefilled.
  int32_t question_tokens = 0;
  // Generation: the continuation whose teacher-forced log-probability under the
  // method is the sample's answer_logprob (e.g. " 48213" after "The pass key is");
  // empty: the task scores no answer that way.
  std::string answer;
};

class Task {
 public:
  virtual ~Task() = default;
  virtual const std::string& name() const = 0;  // the task type, e.g. "passkey"
  virtual TaskKind kind() const = 0;
  // Deterministic in (params, seed, tokenizer): the same call returns the same
  // samples. `max_context` is the model's (or engine's) context limit: a prompt
  // plus the tokens to generate must fit in it, else the error names both.
  virtual Result<std::vector<TaskSample>> samples(const Tokenizer& tok, int32_t max_context,
                                                  uint64_t seed) const = 0;
  // Generation tasks: 1.0 when every expected answer appears in `produced`,
  // else the fraction that does (see contains_answer). 0 for other kinds.
  virtual double score(const TaskSample& sample, const std::string& produced) const;
  // Perplexity: tokens per forward call when the runner feeds a sample
  // (the `chunk` parameter); 0 feeds the whole sample at once.
  virtual int32_t chunk_tokens() const { return 0; }
};

// Whether `answer` occurs in `text` as a whole: case-insensitive, and not glued
// to a longer number or word ("12345" is not found in "123456", nor "cat" in
// "cats"), while punctuation and spaces around it are fine.
bool contains_answer(const std::string& text, const std::string& answer);

// Every task type with its parameters (names, types, defaults, ranges, help).
const std::vector<TaskInfo>& task_catalog();

// Builds a task. Parameters missing from `params` take their defaults; unknown
// names, wrong types and out-of-range values are errors naming the task and key.
Result<std::unique_ptr<Task>> make_task(const std::string& type, const TaskParams& params);

// Where scripts/fetch-corpus.sh puts corpora: $INFERLAB_CORPUS_DIR, default
// ~/.cache/inferlab/corpora.
std::filesystem::path corpus_dir();

// The `path` parameter of corpus tasks: "kjv" is corpus_dir()/kjv.txt (the King
// James Bible); anything else is a file path. A missing file is an error that
// says how to get it.
Result<std::filesystem::path> resolve_corpus(const std::string& name_or_path);

// `count` windows of `length` tokens (BOS first when the tokenizer adds one)
// drawn from a corpus ("kjv" or a text file's path), the same for a seed
// (calibration samples).
Result<std::vector<std::vector<int32_t>>> corpus_windows(const Tokenizer& tok, const std::string& corpus,
                                                         int64_t count, int64_t length, uint64_t seed);

}  // namespace inferlab
