// Drawing figures (results/figures.h) with matplotlib: the script
// plot_figures.py, which the build copies to <build>/share/inferlab/ and
// `cmake --install` puts in <prefix>/share/inferlab/, so both sit at
// ../share/inferlab/ from the inferlab executable; and a Python 3 that has
// matplotlib ($INFERLAB_PYTHON, else python3 on PATH, then /usr/bin/python3).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "inferlab/result.h"

namespace inferlab {

struct PlotTool {
  std::string python;
  std::filesystem::path script;
};

// The script beside this executable and a Python with matplotlib. Errors name
// what is missing: the script's path, python3, or matplotlib (with the
// interpreters asked and the Debian package to install).
Result<PlotTool> find_plot_tool();

// Draws every figure of `spec` (figure_specs' JSON; each figure's "file", or
// else its "id", names its files) into `out_dir` in each format ("svg",
// "png"). Returns the files written, in the order of the figures.
Result<std::vector<std::filesystem::path>> draw_figures(const PlotTool& tool, const nlohmann::json& spec,
                                                        const std::filesystem::path& out_dir,
                                                        const std::vector<std::string>& formats);

// The figures of `spec` as SVG documents, in its order (drawn in a temporary folder).
Result<std::vector<std::string>> draw_svg_documents(const PlotTool& tool, const nlohmann::json& spec);

}  // namespace inferlab
