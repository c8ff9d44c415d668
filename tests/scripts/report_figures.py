#!/usr/bin/env python3
"""Figures and the HTML report, end to end, on a database this test makes.

    report_figures.py setup  INFERLAB WORK   # a tiny synthetic model, a small grid, its database
    report_figures.py plot   INFERLAB WORK   # `inferlab plot`: SVG and PNG files, one line per method
    report_figures.py script INFERLAB WORK   # plot_figures.py on its own: its output and its errors
    report_figures.py html   INFERLAB WORK   # `inferlab report --html` rendered by headless Chromium
    report_figures.py errors INFERLAB WORK   # bad input: missing database, unknown experiment, no matplotlib...

ctest runs `setup` as a fixture of the others (tests/CMakeLists.txt, label
"report"). `plot`, `script` and `html` exit 77 (ctest: skipped) when no Python
with matplotlib is installed, `html` also without Chromium (Debian packages
python3-matplotlib and chromium; scripts/install-deps.sh installs both).
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

SKIP = 77
EXPERIMENT = "figures-test"
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print(f"FAIL: {message}", flush=True)
    return condition


def finish():
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)
    sys.exit(0)


def run(argv, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout)


# ---- the Python the host uses for figures -------------------------------------


def has_matplotlib(python):
    try:
        return subprocess.run([python, "-c", "import matplotlib"], capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


def matplotlib_python():
    """The interpreter inferlab would pick (results/plot_tool.h), or None."""
    chosen = os.environ.get("INFERLAB_PYTHON")
    for python in [chosen] if chosen else ["python3", "/usr/bin/python3"]:
        if has_matplotlib(python):
            return python
    return None


def with_matplotlib():
    """Runs this script under a Python that has matplotlib (re-executing it), or skips."""
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    python = matplotlib_python()
    if python is None or os.environ.get("REPORT_FIGURES_REEXEC"):
        print("SKIP: no Python with matplotlib (Debian: apt-get install python3-matplotlib)", flush=True)
        sys.exit(SKIP)
    os.environ["REPORT_FIGURES_REEXEC"] = "1"
    os.execvp(python, [python] + sys.argv)


# ---- setup ------------------------------------------------------------------

CONFIG = """\
[experiment]
name = "{experiment}"
description = "figures test: KV methods at two budgets on a tiny random model"
seed = 0

[model]
name = "{model}"

[[task]]
type = "fidelity"
path = "{corpus}"
prompt_tokens = 48
new_tokens = 6
samples = 2

[[task]]
type = "fidelity"
path = "{corpus}"
prompt_tokens = 96
new_tokens = 6
samples = 2

[[task]]
type = "perplexity"
path = "{corpus}"
length = 64
samples = 3

[[task]]
type = "passkey"
lengths = [192]
depths = [0.5]
samples = 3

[[method]]
plugin = "streamingllm"
name = "streaming"
sink_tokens = 4
window = [12, 28]

[[method]]
plugin = "h2o"
name = "h2o-16"
heavy = 8
recent = 8

[[method]]
plugin = "h2o"
name = "h2o-32"
heavy = 16
recent = 16

[[method]]
plugin = "streamingllm"
name = "positions"
window = 20
positions = ["cache", "original"]
"""


def setup(inferlab, work):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    model = os.path.join(work, "tiny.gguf")
    r = run([inferlab, "model", "synth", "--preset", "tiny", "-o", model])
    if not check(r.returncode == 0, f"model synth: {r.stderr}"):
        finish()
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w") as f:
        for i in range(400):
            f.write(f"The lighthouse keeper counted {i} ships passing the northern rocks at dawn.\n")
    config = os.path.join(work, "figures.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(experiment=EXPERIMENT, model=model, corpus=corpus))
    db = os.path.join(work, "figures.db")
    r = run([inferlab, "run", config, "--db", db], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    check(r.returncode == 0, f"inferlab run: exit {r.returncode}: {r.stdout}{r.stderr}")
    # A database holding only a dense baseline: nothing to plot.
    dense_only = os.path.join(work, "dense-only.toml")
    with open(dense_only, "w") as f:
        f.write(CONFIG.split("[[task]]")[0].format(experiment="dense-only", model=model) +
                f'[[task]]\ntype = "perplexity"\npath = "{corpus}"\nlength = 32\nsamples = 2\n')
    r = run([inferlab, "run", dense_only, "--db", os.path.join(work, "dense-only.db")], timeout=120)
    check(r.returncode == 0, f"inferlab run (dense only): {r.stdout}{r.stderr}")
    open(os.path.join(work, "empty.db"), "wb").close()
    finish()


# ---- helpers over the database's figures ---------------------------------------


def figure_spec(inferlab, work, name):
    spec_path = os.path.join(work, f"spec-{name}.json")  # the tests after setup may run at once
    r = run([inferlab, "plot", EXPERIMENT, "--db", os.path.join(work, "figures.db"), "--spec", spec_path])
    if not check(r.returncode == 0, f"plot --spec: {r.stderr}"):
        finish()
    with open(spec_path) as f:
        return json.load(f)


def by_id(spec):
    return {f["id"]: f for f in spec["figures"]}


def svg_ids(path):
    root = ET.parse(path).getroot()
    check(root.tag.endswith("svg"), f"{path}: root element is {root.tag}, not svg")
    return [el.get("id") for el in root.iter() if el.get("id")]


def png_pixels(path):
    """(width, height, rows of RGB tuples as bytes) through matplotlib's reader."""
    with open(path, "rb") as f:
        head = f.read(33)
    check(head[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG signature")
    check(head[12:16] == b"IHDR", f"{path}: no IHDR chunk first")
    width, height = struct.unpack(">II", head[16:24])
    check(width > 100 and height > 100, f"{path}: {width}x{height} pixels")
    import matplotlib.image
    return matplotlib.image.imread(path)


def not_blank(image, what, min_colours=20, min_saturated=200):
    import numpy as np
    rgb = np.asarray(image)[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.round(rgb * 255).astype(np.uint8)
    pixels = rgb.reshape(-1, 3)
    non_white = float(np.mean(np.any(pixels < 245, axis=1)))
    colours = len(np.unique(pixels[::7], axis=0))
    saturated = int(np.sum(pixels.max(axis=1).astype(int) - pixels.min(axis=1).astype(int) > 60))
    check(non_white > 0.005, f"{what}: {non_white:.4f} of the pixels are not white")
    check(colours >= min_colours, f"{what}: {colours} distinct colours")
    check(saturated >= min_saturated, f"{what}: {saturated} coloured pixels (the plotted lines)")


# ---- plot ---------------------------------------------------------------------


def plot(inferlab, work):
    with_matplotlib()
    spec = figure_spec(inferlab, work, "plot")
    figs = by_id(spec)
    out = os.path.join(work, "figures")
    shutil.rmtree(out, ignore_errors=True)
    db = os.path.join(work, "figures.db")
    r = run([inferlab, "plot", EXPERIMENT, "--db", db, "--out", out])
    if not check(r.returncode == 0, f"inferlab plot: exit {r.returncode}: {r.stderr}"):
        finish()
    listed = r.stdout.split()
    check(len(listed) == 2 * len(spec["figures"]), f"{len(listed)} files for {len(spec['figures'])} figures")

    # One line per method: the families of the grid, each once.
    fid = "fidelity-prompt-tokens-48"
    expect = {
        f"{fid}-top1-vs-window": ["streaming"],
        f"{fid}-top1-vs-heavy": ["h2o"],
        f"{fid}-top1-vs-keys-read": ["streaming", "h2o", "positions positions=cache",
                                     "positions positions=original"],
        "perplexity-perplexity-vs-window": ["streaming"],
        "passkey-accuracy-vs-heavy": ["h2o"],
    }
    for fig_id, names in expect.items():
        if not check(fig_id in figs, f"no figure {fig_id}; figures: {sorted(figs)}"):
            continue
        got = [s["name"] for s in figs[fig_id]["series"]]
        check(got == names, f"{fig_id}: series {got}, expected {names}")
    heavy = figs.get(f"{fid}-top1-vs-heavy")
    if heavy:
        check([p["x"] for p in heavy["series"][0]["points"]] == [8, 16], f"h2o points: {heavy['series'][0]}")
        check(any("recent varies with heavy" in n for n in heavy["notes"]), f"h2o notes: {heavy['notes']}")
        check(heavy.get("reference", {}).get("y") == 100, f"dense reference: {heavy.get('reference')}")
    bars = figs.get(f"{fid}-top1-by-method")
    if check(bars is not None, "no bar figure for the positions method"):
        check([b["label"] for b in bars["bars"]] == ["positions positions=cache", "positions positions=original"],
              f"bars: {bars['bars']}")
    context = figs.get("fidelity-decode-speedup-vs-prompt-tokens")
    if check(context is not None, "no decode speedup vs context length figure"):
        check(len(context["series"]) == 6, f"context series: {[s['name'] for s in context['series']]}")
        check(all(len(s["points"]) == 2 for s in context["series"]), "each method at both context lengths")
        check(context["group"] == -1 and context["reference"]["y"] == 1.0, f"context reference: {context}")

    # Error bars are the report's intervals.
    report = run([inferlab, "report", EXPERIMENT, "--db", db]).stdout
    ppl = figs.get("perplexity-perplexity-vs-window")
    row = re.search(r"^\| streaming window=12 .*$", report.split("## perplexity")[1], re.M) if ppl else None
    if check(row is not None, "no perplexity row for streaming window=12 in the report"):
        ci = re.search(r"(\d+\.\d\d)–(\d+\.\d\d)", row.group(0))
        point = ppl["series"][0]["points"][0]

        def same(printed, value):  # the report prints two decimals
            return abs(float(printed) - value) <= 0.006 + 1e-12 * abs(value)
        check(ci is not None and same(ci.group(1), point["lo"]) and same(ci.group(2), point["hi"]),
              f"perplexity interval {point} against the report's {row.group(0)}")
    acc = figs.get("passkey-accuracy-vs-heavy")
    if acc:
        check(all("lo" in p and "hi" in p for p in acc["series"][0]["points"]), "accuracy points without Wilson bars")

    # The files: valid SVG with a group per line (or bar), valid non-blank PNG.
    for f in spec["figures"]:
        base = os.path.join(out, f"{EXPERIMENT}_{f['id']}")
        svg, png = base + ".svg", base + ".png"
        if not check(svg in listed and png in listed, f"{f['id']}: files not listed: {svg}, {png}"):
            continue
        ids = svg_ids(svg)
        want = len(f["series"]) if f["kind"] == "line" else len(f["bars"])
        prefix = "series-" if f["kind"] == "line" else "bar-"
        got = len([i for i in ids if i.startswith(prefix)])
        check(got == want, f"{svg}: {got} {prefix}* groups for {want} {'lines' if f['kind'] == 'line' else 'bars'}")
        check(("reference" in ids) == ("reference" in f), f"{svg}: dense reference drawn: {'reference' in ids}")
        values = [p["y"] for s in f.get("series", []) for p in s["points"]] + [b["y"] for b in f.get("bars", [])]
        # Bars of zero (accuracy 0 on a random model) leave nothing coloured.
        not_blank(png_pixels(png), png, min_colours=8, min_saturated=30 if any(values) else 0)
    # Only some figures, one format.
    only = os.path.join(work, "only")
    r = run([inferlab, "plot", EXPERIMENT, "--db", db, "--out", only, "--format", "svg", "--only",
             f"{fid}-top1-vs-heavy"])
    check(r.returncode == 0 and sorted(os.listdir(only)) == [f"{EXPERIMENT}_{fid}-top1-vs-heavy.svg"],
          f"--only: {r.stderr} {os.listdir(only) if os.path.isdir(only) else None}")
    finish()


# ---- the script on its own ------------------------------------------------------


def script(inferlab, work):
    with_matplotlib()
    plot_script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(inferlab))), "share", "inferlab",
                               "plot_figures.py")
    check(os.path.isfile(plot_script), f"{plot_script} missing")
    full = figure_spec(inferlab, work, "script")
    # A line with error bars, a bar figure, a figure across context lengths.
    ids = ["perplexity-perplexity-vs-window", "fidelity-prompt-tokens-48-top1-by-method",
           "fidelity-decode-speedup-vs-prompt-tokens"]
    spec = {"figures": [by_id(full)[i] for i in ids if i in by_id(full)]}
    check(len(spec["figures"]) == 3, f"figures {ids} not all in {sorted(by_id(full))}")
    out = os.path.join(work, "script-out")
    shutil.rmtree(out, ignore_errors=True)
    spec_path = os.path.join(work, "script-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    r = run([sys.executable, plot_script, "--spec", spec_path, "--out", out, "--format", "svg", "--format", "png"])
    check(r.returncode == 0, f"plot_figures.py: {r.stderr}")
    written = r.stdout.split()
    expected = [os.path.join(out, f"{f['file']}.{fmt}") for f in spec["figures"] for fmt in ("svg", "png")]
    check(written == expected and all(os.path.isfile(p) for p in written), f"plot_figures.py wrote {written}")
    check("lo" in spec["figures"][0]["series"][0]["points"][0], f"{ids[0]}: error bars expected: {spec['figures'][0]}")
    for path in written:
        if path.endswith(".svg"):
            svg_ids(path)
        else:
            not_blank(png_pixels(path), path, min_colours=8, min_saturated=30)
    # The same figure twice gives the same file (committed figures do not churn).
    first = [open(p, "rb").read() for p in written if p.endswith(".svg")]
    r = run([sys.executable, plot_script, "--spec", spec_path, "--out", out, "--format", "svg"])
    again = [open(p, "rb").read() for p in written if p.endswith(".svg")]
    check(r.returncode == 0 and first == again, "the SVG files differ between two runs")
    # Bad input is named.
    figure = dict(spec["figures"][0])
    del figure["y_label"]
    bad = os.path.join(work, "bad.json")
    for broken, expect in [({"figures": [figure]}, f"figure '{figure['id']}': missing key 'y_label'"),
                           ({"figures": [dict(spec["figures"][0], file="../up")]}, "is not a plain name"),
                           ({"figures": [dict(spec["figures"][0], kind="pie")]}, "'pie' is not 'line' or 'bar'"),
                           ({"nothing": []}, "missing key 'figures'")]:
        with open(bad, "w") as f:
            json.dump(broken, f)
        r = run([sys.executable, plot_script, "--spec", bad, "--out", out])
        check(r.returncode == 2 and expect in r.stderr, f"bad spec {expect!r}: exit {r.returncode}: {r.stderr}")
    with open(bad, "w") as f:
        f.write("{not json")
    r = run([sys.executable, plot_script, "--spec", bad, "--out", out])
    check(r.returncode == 2 and "not JSON" in r.stderr, f"not JSON: {r.stderr}")
    finish()


# ---- html -----------------------------------------------------------------------

IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !i.complete || i.naturalWidth === 0);
  for (const b of broken) console.error("BROKEN-IMAGE " + b.alt);
  console.log("IMAGES-DECODED " + (images.length - broken.length) + "/" + images.length);
});
</script>
"""


def chromium():
    for name in ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser, page, shot, work, height=2400):
    profile = os.path.join(work, "chromium-profile")
    shutil.rmtree(profile, ignore_errors=True)
    if os.path.exists(shot):
        os.remove(shot)
    argv = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size=1280,{height}", "--virtual-time-budget=5000",
            "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "file://" + os.path.abspath(page)]
    r = run(argv, timeout=90)
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    check(os.path.isfile(shot), f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}")
    return console


def html(inferlab, work):
    browser = chromium()
    if browser is None:
        print("SKIP: no chromium (Debian: apt-get install chromium)", flush=True)
        sys.exit(SKIP)
    with_matplotlib()
    spec = figure_spec(inferlab, work, "html")
    db = os.path.join(work, "figures.db")
    page = os.path.join(work, "report.html")
    r = run([inferlab, "report", EXPERIMENT, "--db", db, "--html", page])
    if not check(r.returncode == 0 and os.path.isfile(page), f"report --html: exit {r.returncode}: {r.stderr}"):
        finish()
    text = open(page, encoding="utf-8").read()
    markdown = run([inferlab, "report", EXPERIMENT, "--db", db]).stdout
    tables = len(re.findall(r"^\|[:-]", markdown, re.M))
    check(text.count("<table>") == tables, f"{text.count('<table>')} HTML tables, {tables} in the text report")
    check(text.count("<img ") == len(spec["figures"]), f"{text.count('<img ')} images, {len(spec['figures'])} figures")
    # Self-contained: nothing fetched, no script.
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']*)""", text, re.I)
    check(not external, f"references outside the page: {external[:5]}")
    check("<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text,
          "a script, link or @import in the page")
    check("streaming window=12" in text and "Plugin counters" in text, "the report's rows and counters")

    shot = os.path.join(work, "report.png")
    console = screenshot(browser, page, shot, work)
    check(not console, f"console messages from the page: {console}")
    if os.path.isfile(shot):
        import matplotlib.image
        image = matplotlib.image.imread(shot)
        check(image.shape[1] == 1280, f"screenshot {image.shape}")
        not_blank(image, "screenshot of the report")
    # Every figure decodes: the same page with a check that logs each image's state.
    probe = os.path.join(work, "report-probe.html")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", IMAGE_CHECK + "</body>"))
    console = screenshot(browser, probe, os.path.join(work, "probe.png"), work, height=600)
    decoded = [line for line in console if "IMAGES-DECODED" in line]
    want = f"IMAGES-DECODED {len(spec['figures'])}/{len(spec['figures'])}"
    check(len(decoded) == 1 and want in decoded[0], f"image check: {console}")
    check(not [line for line in console if "BROKEN-IMAGE" in line], f"broken images: {console}")

    # Without figures: the tables and a note that says so.
    bare = os.path.join(work, "bare.html")
    r = run([inferlab, "report", EXPERIMENT, "--db", db, "--html", bare, "--no-figures"],
            env={"INFERLAB_PYTHON": "/nonexistent/python3"})
    bare_text = open(bare, encoding="utf-8").read() if os.path.isfile(bare) else ""
    check(r.returncode == 0 and "Figures left out (--no-figures)" in bare_text and "<img" not in bare_text and
          bare_text.count("<table>") == tables, f"--no-figures: {r.stderr}")
    finish()


# ---- errors ---------------------------------------------------------------------


def refused(argv, expect, what, env=None, absent=None):
    r = run(argv, env=env)
    check(r.returncode != 0, f"{what}: exit 0")
    check(expect in r.stderr, f"{what}: expected {expect!r} in: {r.stderr.strip()}")
    check("terminate" not in r.stderr and r.returncode < 128 and r.returncode > 0, f"{what}: crashed: {r.returncode}")
    if absent:
        check(not os.path.exists(absent), f"{what}: {absent} written anyway")


def errors(inferlab, work):
    db = os.path.join(work, "figures.db")
    out = os.path.join(work, "error-out")
    page = os.path.join(work, "error.html")
    missing = os.path.join(work, "no-such.db")
    refused([inferlab, "plot", "--db", missing, "--out", out], missing, "plot, missing database", absent=out)
    refused([inferlab, "report", "--db", missing, "--html", page], missing, "report --html, missing database",
            absent=page)
    refused([inferlab, "plot", "nope", "--db", db, "--out", out], "no experiment named 'nope'",
            "plot, unknown experiment", absent=out)
    refused([inferlab, "report", "nope", "--db", db, "--html", page], f"known experiments: {EXPERIMENT}",
            "report --html, unknown experiment", absent=page)
    empty = os.path.join(work, "empty.db")
    refused([inferlab, "plot", "--db", empty, "--out", out], "no experiments recorded yet", "plot, empty database",
            absent=out)
    refused([inferlab, "report", "--db", empty, "--html", page], "no experiments recorded yet",
            "report --html, empty database", absent=page)
    refused([inferlab, "plot", "--db", os.path.join(work, "dense-only.db"), "--out", out], "nothing to plot",
            "plot, dense only", absent=out)
    refused([inferlab, "plot", EXPERIMENT, "--db", db, "--out", out, "--only", "no-such-figure"],
            "has no figure 'no-such-figure'", "plot --only, unknown figure", absent=out)
    refused([inferlab, "plot", EXPERIMENT, "--db", db], "--out FOLDER is required", "plot without --out")
    refused([inferlab, "plot", EXPERIMENT, "--db", db, "--out", out, "--format", "gif"], "gif",
            "plot --format gif", absent=out)
    # No Python, or one without matplotlib: named, nothing written.
    refused([inferlab, "plot", EXPERIMENT, "--db", db, "--out", out], "python3 not found",
            "plot, no python", env={"INFERLAB_PYTHON": "/nonexistent/python3"}, absent=out)
    refused([inferlab, "report", EXPERIMENT, "--db", db, "--html", page], "/nonexistent/python3",
            "report --html, no python", env={"INFERLAB_PYTHON": "/nonexistent/python3"}, absent=page)
    bare_python = os.path.join(work, "python-without-site")
    with open(bare_python, "w") as f:  # a Python whose site packages (matplotlib) are out of reach
        f.write(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    os.chmod(bare_python, 0o755)
    refused([inferlab, "plot", EXPERIMENT, "--db", db, "--out", out], "matplotlib is not installed",
            "plot, no matplotlib", env={"INFERLAB_PYTHON": bare_python}, absent=out)
    refused([inferlab, "report", EXPERIMENT, "--db", db, "--html", page], "--no-figures writes the tables alone",
            "report --html, no matplotlib", env={"INFERLAB_PYTHON": bare_python}, absent=page)
    # The host copied away from its share/inferlab/ names the script it misses.
    lone = os.path.join(work, "lone", "bin")
    os.makedirs(lone, exist_ok=True)
    shutil.copy2(inferlab, lone)
    refused([os.path.join(lone, os.path.basename(inferlab)), "plot", EXPERIMENT, "--db", db, "--out", out],
            os.path.join(work, "lone", "share", "inferlab", "plot_figures.py"), "plot, script missing", absent=out)
    # Listing needs neither Python nor matplotlib.
    r = run([inferlab, "plot", EXPERIMENT, "--db", db, "--list"], env={"INFERLAB_PYTHON": "/nonexistent/python3"})
    check(r.returncode == 0 and "fidelity-prompt-tokens-48-top1-vs-heavy\t" in r.stdout, f"--list: {r.stderr}")
    finish()


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("setup", "plot", "script", "html", "errors"):
        print(__doc__, file=sys.stderr)
        return 2
    command, inferlab, work = sys.argv[1], os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
    if command != "setup" and not os.path.isfile(os.path.join(work, "figures.db")):
        print(f"{work}/figures.db is missing: run the setup step (ctest fixture ReportFigures.Setup)", file=sys.stderr)
        return 1
    globals()[command](inferlab, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
