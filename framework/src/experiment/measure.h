// Runs one configured method over a task's samples on the engine and measures
// what every run records: accuracy, perplexity, fidelity to dense,
// TTFT, TPOT, throughput, KV bytes, and the engine's and plugin's counters.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "datasets/tasks.h"
#include "engine/engine.h"
#include "experiment/catalog.h"
#include "results/database.h"

namespace inferlab {

// Dense outputs of a task's samples, computed once per process and shared by
// every method run of that task (fidelity needs them).
struct DenseReference {
  std::vector<int32_t> tokens;  // greedy tokens dense generated
  std::vector<float> logits;    // (tokens, n_vocab): fidelity tasks only
};
using DenseCache = std::map<std::string, DenseReference>;  // key: task key + "#" + sample index

// Dense prefills of samples, kept in their own page pool (so they never count
// as a run's KV memory), for methods whose prefill is dense (Method::dense_prefill):
// their samples start from a copy instead of recomputing the prompt.
struct PrefillSnapshot {
  std::unique_ptr<KvSequence> seq;
  std::vector<float> last_logits;
  double seconds = 0;  // the dense prefill's time, reported as the run's prefill time
};
struct PrefillCache {
  std::shared_ptr<KvPagePool> pool;
  std::map<std::string, PrefillSnapshot> snapshots;  // key: as DenseCache
  int64_t max_bytes = int64_t(4) << 30;              // snapshots beyond this are not kept
};

struct MeasureContext {
  Engine* engine = nullptr;
  Method* method = nullptr;  // nullptr: the dense baseline
  uint32_t hooks = 0;
  std::string method_name;   // the plugin's, for messages
  const WeightOverrides* overrides = nullptr;  // weights the method replaced for its runs
  int64_t prefill_chunk = 0;  // tokens per forward call while prefilling (0: whole prompt)
  const Task* task = nullptr;
  const TaskParams* task_params = nullptr;
  const std::vector<TaskSample>* samples = nullptr;
  std::string task_key;       // identifies (task, params) for the dense cache
  DenseCache* dense = nullptr;
  PrefillCache* prefills = nullptr;  // nullptr: never reuse a prefill
  std::function<void(int64_t samples_done)> on_sample;
  int64_t batch = 1;  // experiment.batch: sequences one step may run (throughput tasks)
};

struct RunMeasurements {
  std::vector<MetricValue> metrics;
  std::vector<SampleRow> samples;
};

Result<RunMeasurements> measure_run(MeasureContext& context);

// The index of the largest logit (the first of equal ones): greedy decoding.
int32_t argmax(std::span<const float> logits);

// The p-quantile (0..1) of v, interpolated between order statistics; 0 when empty.
double percentile(std::vector<double> v, double p);

// Log-softmax of a logits row, in double.
std::vector<double> log_softmax(std::span<const float> logits);

}  // namespace inferlab
