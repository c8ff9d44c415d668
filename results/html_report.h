// `inferlab report --html FILE`: the report's blocks (the same tables the
// text report prints) and its figures on one self-contained HTML page: CSS
// inline, each figure an SVG inlined as a data: URI, no script and nothing
// fetched from anywhere.
#pragma once

#include <string>
#include <vector>

#include "results/report.h"

namespace inferlab {

struct HtmlFigure {
  int group = -1;  // the section it belongs to (ReportData::groups index); -1: after the sections
  std::string title;
  std::string svg;  // the SVG document
};

// `note`, when not empty, is shown under the heading (why figures are missing, say).
std::string render_html(const ReportData& data, const std::vector<ReportBlock>& blocks,
                        const std::vector<HtmlFigure>& figures, const std::string& note);

}  // namespace inferlab
