// The project's tests use the author's kit helpers (framework/testing).
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "inferlab/testing/support.h"

namespace inferlab::test {

// The trimmed cells of each markdown table row of `text` (lines starting with '|'), in order.
inline std::vector<std::vector<std::string>> table_rows(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] != '|') continue;
    std::vector<std::string> cells;
    std::istringstream in(line.substr(1));
    for (std::string cell; std::getline(in, cell, '|');) {
      const size_t a = cell.find_first_not_of(' '), b = cell.find_last_not_of(' ');
      cells.push_back(a == std::string::npos ? "" : cell.substr(a, b - a + 1));
    }
    rows.push_back(cells);
  }
  return rows;
}

}  // namespace inferlab::test
