// The figures of an experiment, as data: what `inferlab plot` draws and
// `inferlab report --html` inlines. The host decides what each figure shows,
// from the same task sections and intervals as the report's tables; the script
// share/inferlab/plot_figures.py (scripts/plot_figures.py) only draws them
// with matplotlib (results/plot_tool.h runs it).
//
// Per task section: for each method family (the runs of one [[method]], or of
// methods whose names differ only in a number: h2o-64, h2o-128) whose
// parameters vary along a numeric axis (budget, sparsity), one line per family
// (split by any other parameter that varies) of each quality metric (accuracy,
// perplexity, answer log-probability, top-1 agreement, KL), speedup over dense
// (decode where the task decodes, else prefill), and memory (KV cache, stored
// bits per weight), against that axis; when most methods read
// fewer keys than dense, the same against the keys each read per decode step
// (one axis for every KV method); methods without a numeric axis (quantization
// formats, ablations) as bars. Across sections of one task that differ only in
// their context length: each method (quality, decode and prefill speedup)
// against the context length. Dense is a
// horizontal reference (its interval as a band); error bars are the report's
// intervals (Wilson for accuracy, bootstrap for perplexity and log-probability).
#pragma once

#include <nlohmann/json.hpp>

#include "results/report.h"

namespace inferlab {

// {"experiment": name, "figures": [...]}; each figure: id (unique, a file
// name), group (the ReportData::groups index it belongs to, -1 for figures
// across sections), kind ("line" or "bar"), title, x_label, y_label, x_log,
// y_log, series ([{name, color, points: [{x, y, lo?, hi?}]}], line) or bars
// ([{label, color, y, lo?, hi?}], bar), reference ({name, y, lo?, hi?}, when
// dense has the value) and notes (lines of text under the plot).
// colors are indices into one palette, one per series name across the experiment.
nlohmann::json figure_specs(const ReportData& data);

}  // namespace inferlab
