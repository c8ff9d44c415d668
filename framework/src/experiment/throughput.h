// The throughput task's measurement: every sample is a request of a stream
// (arriving at its `arrival_s` tag) served by continuous batching
// (engine/batch_scheduler.h) through Engine::forward_batch, at most
// MeasureContext::batch sequences a step and the task's KV budget.
//
// The clock is the steps' own time: a step's wall time advances it, and when
// nothing runs it jumps to the next arrival (no sleeping). Before the clock
// starts, the first request runs alone once to measure the KV pages a request
// holds at each length under the method (an evicting method holds fewer);
// the scheduler admits and preempts by that curve, and the pages the running
// sequences really hold after each step are checked against the budget
// (`kv_budget_overruns`). Each request generates exactly its new tokens
// (end of sequence ignored), greedily; a sample row's `produced` holds the
// generated token ids, space-separated.
//
// Metrics: output_tokens_per_s, requests_per_s, ttft / tpot / latency
// percentiles (p50, p90, p99) under load, kv_pages_peak / kv_pages_mean (of
// the pages budget kv_pages_budget), preemptions, batch_mean / batch_max
// (sequences per step), and the engine's and the method's counters.
#pragma once

#include "experiment/measure.h"

namespace inferlab {

Result<RunMeasurements> measure_throughput(MeasureContext& context);

}  // namespace inferlab
