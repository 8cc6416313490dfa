"""A BENCHMARKS.md section listing every row of some ``benchmarks.compare`` result files, with their commands.

    python -m benchmarks.rows --title "## EPTQ variants" --note "..." i11_base_w2 i11_bqh_w2 [--write]

Rows are grouped by model and bit width, each with top-1, the change versus float, wall time of the quantize
call, the seed and the file it came from. Method names are the compare names (``eptq+block+qdrop`` and so on:
see ``benchmarks/methods.py`` VARIANTS).
"""
from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.common import REPO_ROOT
from benchmarks.report import replace_section

RESULTS = REPO_ROOT / "benchmarks" / "results"


def load(names: list[str]) -> tuple[list[dict], list[str], dict]:
    rows, commands, machine = [], [], {}
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        commands += [c for c in data["commands"] if c not in commands]
        machine = data.get("machine", machine)
        rows += [{**r, "file": name} for r in data["results"] if r.get("status") == "ok"]
    return rows, commands, machine


def section(title: str, note: str, names: list[str]) -> str:
    rows, commands, machine = load(names)
    floats = {r["model"]: r["top1"] for r in rows if r["method"] == "float"}
    out = [title, ""]
    if note:
        out += [note, ""]
    out += ["| model | bits | method | top-1 | vs float | quantize s | seed | file |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    quant = sorted((r for r in rows if r["method"] != "float"),
                   key=lambda r: (r["model"], r["bits"], r["method"], r.get("seed", 0)))
    for r in quant:
        ref = floats.get(r["model"])
        delta = f"{r['top1'] - ref:+.2f}" if ref is not None else "–"
        out.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['top1']:.2f} | {delta} | "
                   f"{r['quantize_s']:.0f} | {r.get('seed', 0)} | {r['file']} |")
    groups: dict[tuple, list[float]] = {}
    for r in quant:
        groups.setdefault((r["model"], r["bits"], r["method"]), []).append(r["top1"])
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        out += ["", "Mean over seeds:", "", "| model | bits | method | seeds | mean top-1 |", "|---|---|---|---:|---:|"]
        out += [f"| {m} | {b} | {meth} | {len(v)} | {statistics.mean(v):.2f} |" for (m, b, meth), v in multi.items()]
    out += ["", "Floats: " + ", ".join(f"{m} {t:.2f}" for m, t in sorted(floats.items())) + ".", "",
            "Commands:", ""] + [f"    {c}" for c in commands]
    out += ["", f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
            f"{', '.join(f'{k} {v}' for k, v in machine.get('versions', {}).items())}. Runs shared the two cores "
            "(two at a time, one thread each): wall times are upper bounds."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+")
    p.add_argument("--title", required=True)
    p.add_argument("--note", default="")
    p.add_argument("--write", action="store_true", help="replace (or append) the section in BENCHMARKS.md")
    args = p.parse_args(argv)
    text = section(args.title, args.note, args.names)
    print(text)
    if args.write:
        path = REPO_ROOT / "BENCHMARKS.md"
        path.write_text(replace_section(path.read_text(), text, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
