"""bench/run's summary: reads each benchmark's output in RESULTS (written
by bench/run), writes RESULTS/README.md (the ratios against their targets
first, then each step's time and full output) and RESULTS/ratios.png.

Usage: /usr/bin/python3 bench/summarise.py RESULTS SECONDS
"""

import re
import sys
from pathlib import Path

results = Path(sys.argv[1])
total_seconds = int(sys.argv[2])


def text(step):
    p = results / f"{step}.txt"
    return p.read_text() if p.exists() else ""


# Each figure: (benchmark, what, value, unit, target, lower is better).
figures = []


def add(step, what, value, unit, target=None, lower=True):
    figures.append((step, what, float(value), unit, target, lower))


for m in re.finditer(
    r"^(loopback|throttled)\s+(lazy|upstream|pull)\s+\d+\s+[\d.]+\s+([\d.]+)%\s+([\d.]+)%",
    text("builder"),
    re.M,
):
    link, run, by, wall = m.groups()
    throttled = link == "throttled"
    add("builder", f"{run} bytes / eager, {link}", by, "%",
        2 if throttled and run == "lazy" else None)
    add("builder", f"{run} wall / eager, {link}", wall, "%",
        10 if throttled and run == "lazy" else None)

cold = text("cold")
for m in re.finditer(
    r"^(rust|python)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)×\s+(?:[\d.]+\s+)*([\d.]+)×\s+(\d+)", cold, re.M
):
    tree, vs_eager, vs_native, rss = m.groups()
    add("cold", f"{tree}: cold walk through serve / eager nix copy (median pair)", vs_eager, "×", 1.0)
    add("cold", f"{tree}: mount peak RSS", rss, "MiB", 200 if tree == "rust" else None)
for m in re.finditer(r"^(rust|python)\s+[\d.]+\s+[\d.]+\s+([\d.]+)×\s*$", cold, re.M):
    tree, ratio = m.groups()
    add("cold", f"{tree}: local-store mount / native, cold (speed)", ratio, "×", 0.5, lower=False)

for m in re.finditer(r"^(rust|python)\s+(default|--passthrough)\s+(hash|stats)\s+[\d.]+\s+[\d.]+\s+([\d.]+)×",
                     text("warm"), re.M):
    tree, mode, walk, ratio = m.groups()
    what = "nix hash path" if walk == "hash" else "find + stat"
    add("warm", f"{tree}: warm {what} / native (speed), {mode}", ratio, "×",
        (0.8 if walk == "hash" else 0.9) if mode == "default" else None, lower=False)

m = re.search(r"lazy / native speed: ([\d.]+)×", text("bigfile"))
if m:
    add("bigfile", "cold read of a 200 MB file through serve / native (speed)", m.group(1), "×",
        0.5, lower=False)

m = re.search(r"^--prefetch\s+[\d.]+\s+\d+\s+\d+\s+([\d.]+)×\s+([\d.]+)×", text("trace"), re.M)
if m:
    add("trace", "500 files at 100 Mbit/s with --prefetch: wall / none", m.group(1), "×", 0.5)
    add("trace", "... gRPC requests / none", m.group(2), "×", 0.2)
m = re.search(r"^shared\s+[\d.]+\s+\d+\s+\d+\s+([\d.]+)×\s+([\d.]+)×", text("trace"), re.M)
if m:
    add("trace", "... with the service's trace (--prefetch-shared): wall / none", m.group(1), "×", 0.5)
    add("trace", "... gRPC requests / none", m.group(2), "×", 0.2)

m = re.search(r"^fetched \(chunks\)\s+\d+\s+([\d.]+)%", text("partial"), re.M)
if m:
    add("partial", "a build reading 5 % of the closure: fetched / closure", m.group(1), "%", 10)

storage = text("storage")
for m in re.finditer(
    r"^(rust|python)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)×\s+[\d.]+\s+([\d.]+)×", storage, re.M
):
    tree, imported, compacted = m.groups()
    add("storage", f"{tree}: stored as imported / zstd NAR", imported, "×")
    add("storage", f"{tree}: stored compacted / zstd NAR", compacted, "×", 1.0)
m = re.search(r"lazystore import / nix copy time: ([\d.]+)×", storage)
if m:
    add("storage", "import / nix copy, time", m.group(1), "×", 1.0)
for m in re.finditer(r"^(rust|python)\s+[\d.]+\s+[\d.]+\s+([\d.]+)×\s*$", storage, re.M):
    add("storage", f"{m.group(1)}: cold walk, compacted / as imported", m.group(2), "×", 1.0)

versions = text("versions")
for m in re.finditer(r"^(\S+ -> \S+)\s+compacted\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)×",
                     versions, re.M):
    add("versions", f"{m.group(1)}: extra / its zstd NAR", m.group(2), "×")
m = re.search(r"^[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)×\s+[\d.]+×", versions, re.M)
if m:
    add("versions", "the corpus compacted / sum of zstd NARs", m.group(1), "×", 0.8)

rebuild = text("rebuild")
for m in re.finditer(r"^(imported|compacted) \((stored bytes|packs \+ index)\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)×",
                     rebuild, re.M):
    mode, what, ratio = m.groups()
    add("rebuild", f"a rebuild against another dependency, {mode}: extra / first ({what})",
        ratio, "×", 0.05 if (mode, what) == ("compacted", "stored bytes") else None)

m = re.search(r"fsck / nix hash path: ([\d.]+) x", text("fsck"))
if m:
    add("fsck", "fsck speed / nix hash path", m.group(1), "×", lower=False)
m = re.search(r"([\d.]+) s per GB reclaimed", text("gc"))
if m:
    add("gc", "gc seconds per GB reclaimed", m.group(1), "s")


def met(value, target, lower):
    if target is None:
        return ""
    return "met" if (value <= target if lower else value >= target) else "**not met**"


step_seconds = sum(int(line.split("\t")[1])
                   for line in filter(None, (results / "steps.tsv").read_text().split("\n")))
out = ["# Benchmark results", "",
       f"Written by `bench/run` (its last call took {total_seconds} s; the steps below took "
       f"{step_seconds} s in all, each in the last call that ran it). Ratios are against a "
       "baseline measured in the same run; absolute figures follow.", "",
       "| benchmark | figure | value | target | |", "|---|---|---:|---:|---|"]
for step, what, value, unit, target, lower in figures:
    t = "" if target is None else f"{'≤' if lower else '≥'} {target:g} {unit}"
    out.append(f"| {step} | {what} | {value:g} {unit} | {t} | {met(value, target, lower)} |")
out += ["", "| step | seconds | exit |", "|---|---:|---:|"]
ORDER = "builder cold warm bigfile trace partial storage versions rebuild fsck gc".split()
steps = sorted(
    filter(None, (results / "steps.tsv").read_text().split("\n")),
    key=lambda line: ORDER.index(line.split("\t")[0]) if line.split("\t")[0] in ORDER else 99,
)
for line in filter(None, steps):
    step, secs, status = line.split("\t")
    out.append(f"| `bench/{step}.sh` | {secs} | {status} |")
for line in filter(None, steps):
    step = line.split("\t")[0]
    out += ["", f"## `bench/{step}.sh`", "", "```", text(step).rstrip(), "```"]
(results / "README.md").write_text("\n".join(out) + "\n")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

targeted = [f for f in figures if f[4] is not None]
labels = [f"{f[0]}: {f[1]}" for f in targeted]
# Each as a fraction of its target, turned so that under 1 is met.
scores = [(f[2] / f[4]) if f[5] else (f[4] / f[2]) for f in targeted]
fig, ax = plt.subplots(figsize=(11, 0.42 * len(targeted) + 1.5))
colours = ["tab:green" if s <= 1 else "tab:red" for s in scores]
ax.barh(range(len(scores)), scores, color=colours)
ax.axvline(1.0, color="black", linewidth=1)
ax.set_yticks(range(len(labels)), labels, fontsize=8)
ax.invert_yaxis()
for i, f in enumerate(targeted):
    ax.text(scores[i], i, f"  {f[2]:g} {f[3]}", va="center", fontsize=8)
ax.set_xlabel("value against its target (left of 1: met)")
ax.set_title("lazystore benchmarks (bench/run)")
fig.tight_layout()
fig.savefig(results / "ratios.png", dpi=110)
