// `inferlab calibrate` with an [ltt] table: a threshold certified by Learn
// then Test from the finished runs of one method's grid (config.h, LttSection;
// the statistics in experiment/risk_control.h).
#pragma once

#include <cstdio>
#include <vector>

#include "experiment/config.h"
#include "inferlab/result.h"
#include "results/database.h"

namespace inferlab {

struct LttOutcome {
  bool certified = false;
  double value = 0;             // the certified value of the parameter
  double held_out_risk = 0;     // its risk on the held-out samples of the first split
  int64_t splits = 0;
  int64_t violations = 0;       // splits whose held-out risk at their certified value exceeds delta
  int64_t abstentions = 0;      // splits that certified no value
};

// Reads each grid point of ltt.method's runs from `db` (every one must be
// finished), certifies, writes ltt.output (atomically) and a per-split table
// beside it (<output>.splits.tsv), and prints what it found to `out`.
Result<LttOutcome> certify_by_ltt(const ExperimentConfig& config, const std::vector<RunSpec>& grid, ResultsDb& db,
                                  std::FILE* out);

}  // namespace inferlab
