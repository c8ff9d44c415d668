// `inferlab report`: for each task of an experiment, a markdown table of every
// method beside the dense baseline (deltas and ratios against it), then the
// counters each plugin reported, so a method that silently did nothing shows.
#pragma once

#include <string>

#include "inferlab/result.h"
#include "results/database.h"

namespace inferlab {

// experiment empty: the most recently created one. An unknown experiment, or
// one without finished runs, is an error that lists the known experiments.
Result<std::string> render_report(ResultsDb& db, const std::string& experiment);

}  // namespace inferlab
