// `inferlab report`: for each task of an experiment, a table of every method
// beside the dense baseline (deltas and ratios against it), then the counters
// each plugin reported, so a method that silently did nothing shows. The
// report is built once as blocks (headings, paragraphs, tables, lists) and
// written as markdown (the terminal) or as HTML (results/html_report.h);
// figures (results/figures.h) read the same task sections.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "inferlab/result.h"
#include "results/database.h"
#include "results/statistics.h"

namespace inferlab {

// A task section: the finished runs of one task configuration (task type and
// parameters; and backend, when the experiment ran on two), the dense
// baseline first. A method run again under another configuration hash keeps
// one row, the latest.
struct ReportGroup {
  std::string title;  // the task, and what tells it from the other sections of its type
  std::string task, backend;
  nlohmann::json params;  // the task's parameters as recorded
  std::vector<const StoredRun*> runs;
  const StoredRun* baseline = nullptr;  // null: no dense baseline finished
  int superseded = 0;                   // earlier runs that gave way to a later one
};

// An experiment's runs as the report reads them. Groups point into `runs`:
// move it, never copy it.
struct ReportData {
  ExperimentInfo experiment;
  std::string db_path;
  std::vector<StoredRun> runs;  // every run, finished and failed, in grid order
  std::vector<ReportGroup> groups;

  ReportData() = default;
  ReportData(ReportData&&) noexcept = default;
  ReportData& operator=(ReportData&&) noexcept = default;
  ReportData(const ReportData&) = delete;
  ReportData& operator=(const ReportData&) = delete;
};

// experiment empty: the most recently created one. An unknown experiment, or
// one without finished runs, is an error that lists the known experiments.
Result<ReportData> load_report(ResultsDb& db, const std::string& experiment);

// Cells are plain text (labels one line); renderers escape them.
struct ReportTable {
  std::vector<std::string> header;
  std::vector<bool> right;  // numbers are right-aligned
  std::vector<std::vector<std::string>> rows;
};

struct ReportBlock {
  enum class Kind { Heading, Paragraph, Table, List };
  Kind kind = Kind::Paragraph;
  int level = 1;                   // Heading: 1 (the experiment) or 2 (a section)
  std::string text;                // Heading and Paragraph; List: the line before the items (may be empty)
  ReportTable table;               // Table
  std::vector<std::string> items;  // List
  int group = -1;                  // the ReportData::groups index the block belongs to; -1: none
};

std::vector<ReportBlock> report_blocks(const ReportData& data);

// Markdown, tables padded so they also read well in a terminal.
std::string render_markdown(const std::vector<ReportBlock>& blocks);

// load_report, report_blocks and render_markdown: what `inferlab report` prints.
Result<std::string> render_report(ResultsDb& db, const std::string& experiment);

// The statistics the tables put beside a run's figures, recomputed from its
// stored samples; nullopt where the run has no samples to compute them from.
std::optional<Interval> accuracy_interval(const StoredRun& run);        // Wilson 95%, as a fraction
std::optional<Interval> perplexity_interval(const StoredRun& run);      // bootstrap 95% over windows
std::optional<Interval> answer_logprob_interval(const StoredRun& run);  // bootstrap 95% of the mean

// The metric's value, or nullopt when the run lacks it (or stored NaN).
std::optional<double> run_metric(const StoredRun& run, const std::string& name);

}  // namespace inferlab
