#!/usr/bin/env python3
"""Draws inferlab's figures with matplotlib.

The inferlab host decides what each figure shows (results/figures.h: which
runs, which axis, the report's intervals) and hands this script the data as
JSON; the script only draws. `inferlab plot` and `inferlab report --html` run
it from <bin>/../share/inferlab/ (the build tree, or an installed prefix).

    plot_figures.py --spec FIGURES.json --out FOLDER [--format svg] [--format png]

FIGURES.json: {"figures": [figure, ...]}; a figure has id, kind ("line" or
"bar"), title, x_label, y_label, x_log, y_log, series (line: [{name, color,
points: [{x, y, lo?, hi?}]}]) or bars (bar: [{label, color, y, lo?, hi?}]),
reference ({name, y, lo?, hi?}: dense, a dashed horizontal line, its interval
a band), notes (lines under the plot) and optionally file (the file name
without extension; default: the id). Prints each file it writes, one a line.
In an SVG every line is a group with id "series-<i>", every bar "bar-<i>",
the reference "reference".

Exit status: 0 drawn; 2 bad input (the message names the figure and key);
3 matplotlib missing.
"""

import argparse
import json
import math
import os
import re
import sys

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SpecError(Exception):
    pass


def need(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise SpecError(f"{where}: missing key '{key}'")
    value = obj[key]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, kind):
        raise SpecError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def interval(obj, y, where):
    """(below, above) error bar lengths, or None."""
    if "lo" not in obj and "hi" not in obj:
        return None
    lo, hi = need(obj, "lo", float, where), need(obj, "hi", float, where)
    return max(0.0, y - lo), max(0.0, hi - y)


def color_of(index):
    if not isinstance(index, int) or index < 0:
        return "#000000"
    return PALETTE[index % len(PALETTE)]


def marker_of(index):
    if not isinstance(index, int) or index < 0:
        return "*"
    return MARKERS[index % len(MARKERS)]


def number_text(v):
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def draw_reference(ax, fig_spec, where, vertical=False):
    ref = fig_spec.get("reference")
    if ref is None:
        return
    y = need(ref, "y", float, where + ".reference")
    name = ref.get("name", "dense")
    band = interval(ref, y, where + ".reference")
    if vertical:
        line = ax.axvline(y, color="0.25", linestyle="--", linewidth=1.1, label=name, zorder=4)
        if band:
            ax.axvspan(y - band[0], y + band[1], color="0.5", alpha=0.12, linewidth=0, zorder=0)
    else:
        line = ax.axhline(y, color="0.25", linestyle="--", linewidth=1.1, label=name, zorder=1)
        if band:
            ax.axhspan(y - band[0], y + band[1], color="0.5", alpha=0.12, linewidth=0, zorder=0)
    line.set_gid("reference")


def draw_line(plt, fig_spec, where):
    from matplotlib.ticker import FuncFormatter, NullFormatter
    series = need(fig_spec, "series", list, where)
    if not series:
        raise SpecError(f"{where}: 'series' is empty")
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    draw_reference(ax, fig_spec, where)
    xs_all = []
    for i, s in enumerate(series):
        sw = f"{where}.series[{i}]"
        name = need(s, "name", str, sw)
        points = need(s, "points", list, sw)
        if not points:
            raise SpecError(f"{sw}: 'points' is empty")
        xs, ys, below, above, has_err = [], [], [], [], False
        for j, p in enumerate(points):
            pw = f"{sw}.points[{j}]"
            x, y = need(p, "x", float, pw), need(p, "y", float, pw)
            err = interval(p, y, pw)
            has_err = has_err or err is not None
            xs.append(x)
            ys.append(y)
            below.append(err[0] if err else 0.0)
            above.append(err[1] if err else 0.0)
        xs_all += xs
        c = s.get("color", i)
        container = ax.errorbar(xs, ys, yerr=[below, above] if has_err else None, color=color_of(c),
                                marker=marker_of(c), markersize=5 if c != -1 else 8, linewidth=1.6, capsize=3,
                                elinewidth=1.0, label=name, zorder=3)
        container.lines[0].set_gid(f"series-{i}")
    if fig_spec.get("x_log") and min(xs_all) > 0:
        ax.set_xscale("log", base=2)
    ticks = sorted(set(xs_all))
    if len(ticks) <= 12:
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: number_text(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if fig_spec.get("y_log"):
        ax.set_yscale("log")
    ax.set_xlabel(fig_spec.get("x_label", ""))
    ax.set_ylabel(need(fig_spec, "y_label", str, where))
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    return fig, ax


def draw_bar(plt, fig_spec, where):
    bars = need(fig_spec, "bars", list, where)
    if not bars:
        raise SpecError(f"{where}: 'bars' is empty")
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.32 * len(bars)))
    labels, values, below, above, colors, has_err = [], [], [], [], [], False
    for i, b in enumerate(bars):
        bw = f"{where}.bars[{i}]"
        labels.append(need(b, "label", str, bw))
        y = need(b, "y", float, bw)
        values.append(y)
        err = interval(b, y, bw)
        has_err = has_err or err is not None
        below.append(err[0] if err else 0.0)
        above.append(err[1] if err else 0.0)
        colors.append(color_of(b.get("color", i)))
    positions = list(range(len(bars)))
    patches = ax.barh(positions, values, xerr=[below, above] if has_err else None, color=colors, height=0.62,
                      error_kw={"elinewidth": 1.0, "capsize": 3}, zorder=2)
    for i, patch in enumerate(patches):
        patch.set_gid(f"bar-{i}")
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    draw_reference(ax, fig_spec, where, vertical=True)
    if fig_spec.get("y_log") and min(values) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(need(fig_spec, "y_label", str, where))
    ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    if fig_spec.get("reference") is not None:
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    return fig, ax


def draw(plt, fig_spec, index, out, formats):
    where = f"figures[{index}]"
    fig_id = need(fig_spec, "id", str, where)
    where = f"figure '{fig_id}'"
    file_name = fig_spec.get("file", fig_id)
    if not isinstance(file_name, str) or not FILE_NAME.match(file_name):
        raise SpecError(f"{where}: file name {file_name!r} is not a plain name (letters, digits, . _ -)")
    kind = need(fig_spec, "kind", str, where)
    if kind == "line":
        fig, ax = draw_line(plt, fig_spec, where)
    elif kind == "bar":
        fig, ax = draw_bar(plt, fig_spec, where)
    else:
        raise SpecError(f"{where}: kind {kind!r} is not 'line' or 'bar'")
    ax.set_title(need(fig_spec, "title", str, where), fontsize=9.5)
    notes = fig_spec.get("notes", [])
    if notes:
        ax.annotate("\n".join(str(n) for n in notes), xy=(0, 0), xycoords="axes fraction", xytext=(0, -30),
                    textcoords="offset points", va="top", ha="left", fontsize=7, color="0.35")
    written = []
    for fmt in formats:
        path = os.path.join(out, f"{file_name}.{fmt}")
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        fig.savefig(path, format=fmt, dpi=110, bbox_inches="tight", metadata=metadata)
        written.append(path)
    plt.close(fig)
    return written


def main(argv):
    parser = argparse.ArgumentParser(description="Draw inferlab figures (JSON from `inferlab plot --spec`).")
    parser.add_argument("--spec", required=True, help="the figures' JSON ('-': standard input)")
    parser.add_argument("--out", required=True, help="folder for the files")
    parser.add_argument("--format", action="append", choices=["svg", "png"], help="svg, png (repeatable)")
    args = parser.parse_args(argv)
    formats = args.format or ["svg", "png"]
    try:
        text = sys.stdin.read() if args.spec == "-" else open(args.spec, encoding="utf-8").read()
    except OSError as e:
        print(f"plot_figures.py: {args.spec}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        print(f"plot_figures.py: {args.spec}: not JSON: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib
    except ImportError:
        print(f"plot_figures.py: matplotlib is not installed for {sys.executable} "
              "(Debian: apt-get install python3-matplotlib)", file=sys.stderr)
        return 3
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams.update({
        "svg.fonttype": "none",      # text stays text: small files
        "svg.hashsalt": "inferlab",  # the same figure gives the same file
        "font.family": "DejaVu Sans",
        "font.size": 8.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
    })
    try:
        figures = need(spec, "figures", list, args.spec)
        os.makedirs(args.out, exist_ok=True)
        for i, fig_spec in enumerate(figures):
            for path in draw(plt, fig_spec, i, args.out, formats):
                print(path, flush=True)
    except SpecError as e:
        print(f"plot_figures.py: {args.spec}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plot_figures.py: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
