#include "results/html_report.h"

#include <fmt/format.h>

#include <cstdint>

namespace inferlab {

namespace {

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string base64(const std::string& bytes) {
  static const char* const kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v = uint32_t(uint8_t(bytes[i])) << 16 | uint32_t(uint8_t(bytes[i + 1])) << 8 | uint8_t(bytes[i + 2]);
    out += {kAlphabet[v >> 18], kAlphabet[(v >> 12) & 63], kAlphabet[(v >> 6) & 63], kAlphabet[v & 63]};
  }
  if (const size_t rest = bytes.size() - i; rest > 0) {
    const uint32_t v = uint32_t(uint8_t(bytes[i])) << 16 | (rest > 1 ? uint32_t(uint8_t(bytes[i + 1])) << 8 : 0);
    out += kAlphabet[v >> 18];
    out += kAlphabet[(v >> 12) & 63];
    out += rest > 1 ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

constexpr const char* kStyle = R"css(
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #1a1a1a; background: #fff;
       margin: 0; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.25em; margin: 1.6em 0 0.5em; padding-bottom: 0.2em; border-bottom: 1px solid #ddd; }
p { margin: 0.5em 0; }
p.note { background: #f6f6f6; border-left: 3px solid #888; padding: 6px 10px; }
.scroll { overflow-x: auto; margin: 0.6em 0 1em; }
table { border-collapse: collapse; font-size: 0.86em; }
th, td { border: 1px solid #d4d4d4; padding: 3px 8px; white-space: nowrap; }
th { background: #f2f2f2; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 16px 20px; margin: 0.8em 0 1.2em; }
figure { margin: 0; flex: 0 1 550px; min-width: 320px; }
figure img { width: 100%; height: auto; display: block; }
details { margin: 0.4em 0 1em; font-size: 0.85em; }
details li { word-break: break-all; }
ul { margin: 0.4em 0 1em; }
)css";

void table_html(const ReportTable& t, std::string& out) {
  out += "<div class=\"scroll\"><table>\n<thead><tr>";
  for (size_t i = 0; i < t.header.size(); ++i)
    out += fmt::format("<th{}>{}</th>", i < t.right.size() && t.right[i] ? " class=\"num\"" : "", escape(t.header[i]));
  out += "</tr></thead>\n<tbody>\n";
  for (const auto& row : t.rows) {
    out += "<tr>";
    for (size_t i = 0; i < row.size(); ++i)
      out += fmt::format("<td{}>{}</td>", i < t.right.size() && t.right[i] ? " class=\"num\"" : "", escape(row[i]));
    out += "</tr>\n";
  }
  out += "</tbody></table></div>\n";
}

void figures_html(const std::vector<const HtmlFigure*>& figures, std::string& out) {
  if (figures.empty()) return;
  out += "<div class=\"figures\">\n";
  for (const HtmlFigure* f : figures)
    out += fmt::format("<figure><img alt=\"{}\" src=\"data:image/svg+xml;base64,{}\"></figure>\n", escape(f->title),
                       base64(f->svg));
  out += "</div>\n";
}

}  // namespace

std::string render_html(const ReportData& data, const std::vector<ReportBlock>& blocks,
                        const std::vector<HtmlFigure>& figures, const std::string& note) {
  std::vector<std::vector<const HtmlFigure*>> by_group(data.groups.size());
  std::vector<const HtmlFigure*> across;
  for (const HtmlFigure& f : figures) {
    if (f.group >= 0 && size_t(f.group) < by_group.size()) {
      by_group[size_t(f.group)].push_back(&f);
    } else {
      across.push_back(&f);
    }
  }
  std::string out = fmt::format(
      "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
      "<title>inferlab report: {}</title>\n<style>{}</style>\n</head>\n<body>\n<main>\n",
      escape(data.experiment.name), kStyle);
  std::vector<bool> shown(data.groups.size(), false);
  bool noted = note.empty();
  for (const ReportBlock& b : blocks) {
    switch (b.kind) {
      case ReportBlock::Kind::Heading:
        out += fmt::format("<h{0}>{1}</h{0}>\n", b.level <= 1 ? 1 : 2, escape(b.text));
        if (!noted) {
          out += fmt::format("<p class=\"note\">{}</p>\n", escape(note));
          noted = true;
        }
        break;
      case ReportBlock::Kind::Paragraph:
        out += fmt::format("<p>{}</p>\n", escape(b.text));
        break;
      case ReportBlock::Kind::Table:
        table_html(b.table, out);
        // A section's figures follow its main table (the first).
        if (b.group >= 0 && size_t(b.group) < shown.size() && !shown[size_t(b.group)]) {
          shown[size_t(b.group)] = true;
          figures_html(by_group[size_t(b.group)], out);
        }
        break;
      case ReportBlock::Kind::List: {
        std::string items;
        for (const std::string& item : b.items) items += fmt::format("<li>{}</li>\n", escape(item));
        if (b.text.empty()) {
          out += "<ul>\n" + items + "</ul>\n";
        } else {
          out += fmt::format("<details><summary>{}</summary>\n<ul>\n{}</ul>\n</details>\n", escape(b.text), items);
        }
        break;
      }
    }
  }
  if (!across.empty()) {
    out += "<h2>Across context lengths</h2>\n";
    figures_html(across, out);
  }
  out += fmt::format("<p class=\"note\">Written by inferlab from {}.</p>\n", escape(data.db_path));
  return out + "</main>\n</body>\n</html>\n";
}

}  // namespace inferlab
