"""Write the "## EPTQ" section of BENCHMARKS.md from result files of ``benchmarks.compare`` runs.

    python -m benchmarks.eptq_report r20_main r20_eptq r20_ablation convmixer_rtn r56_main r56_eptq convmixer_eptq

Each name is a ``benchmarks/results/<name>.json`` written by ``python -m benchmarks.compare ... --out <name>``;
the section lists, per model and bit width, float / RTN / EPTQ top-1 with wall time and peak RSS, then the
ablations, then the commands that produced every row.
"""
from __future__ import annotations

import json
import sys

from benchmarks.common import REPO_ROOT
from benchmarks.report import replace_section

TITLE = "## EPTQ"
RESULTS = REPO_ROOT / "benchmarks" / "results"
LABELS = {"rtn": "RTN", "eptq": "EPTQ (default: block-wise, Hessian-weighted, 500 steps/block)",
          "eptq_exact": "EPTQ default, exact Hessian along the 10 logits (current code)",
          "eptq_uniform": "EPTQ, uniform weights (no Hessian)",
          "eptq_channel": "EPTQ, Hessian weights per sample and channel",
          "eptq_channel_mean": "EPTQ, Hessian weights per channel, averaged over samples (superseded variant)",
          "eptq_kl": "EPTQ, Hessian of the KL to the model's own softmax (label-free)",
          "eptq_hmse": "EPTQ + HMSE weight thresholds",
          "eptq_network": "EPTQ, network-wise, Hessian-weighted (2000 steps)",
          "eptq_network_uniform": "EPTQ, network-wise, uniform weights (2000 steps)",
          "eptq_network_tr": "EPTQ, network-wise, layer weight tr instead of tr/D (superseded, 2000 steps)"}


def _load(names: list[str]) -> tuple[list[dict], list[str], dict]:
    rows, commands, machine = {}, [], {}
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        commands += [c for c in data["commands"] if c not in commands]
        machine = data.get("machine", machine)
        for r in data["results"]:
            if r.get("status") == "ok":
                rows[(r["model"], r["method"], r["bits"], r.get("seed", 0))] = r  # later files win
    return list(rows.values()), commands, machine


def _cell(r: dict | None, ref: float | None) -> str:
    if r is None:
        return "—"
    drop = f" ({r['top1'] - ref:+.2f})" if ref is not None else ""
    return f"{r['top1']:.2f}{drop}"


def section(all_rows: list[dict], commands: list[str], machine: dict) -> str:
    rows = [r for r in all_rows if not r.get("seed")]  # the tables: seed 0; other seeds show the spread
    by = {(r["model"], r["method"], r["bits"]): r for r in rows}
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "resnet20", m))
    out = [TITLE, "",
           "Top-1 on CIFAR-10 (JPEG copy, all 10,000 test images; calibration: a fixed seeded sample of 1024 "
           "`train_10k` images, no labels). First and last weight layer, and their input activations, at 8 bits. "
           "In brackets: change versus float. Time: the whole `eptq_fx.quantize` call (capture, calibration, "
           "Hessian, reconstruction, convert); peak RSS of the process.", "",
           "| model | bits | float | RTN | EPTQ | EPTQ time | EPTQ peak RSS |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        ref = by.get((m, "float", "FP32"), {}).get("top1")
        for bits in ("W8A8", "W4A8", "W4A4", "W2A4"):
            rtn, eptq = by.get((m, "rtn", bits)), by.get((m, "eptq", bits))
            if rtn is None and eptq is None:
                continue
            t = f"{eptq['quantize_s']:.0f} s" if eptq else "—"
            rss = f"{eptq['peak_rss_mib']:.0f} MiB" if eptq else "—"
            out.append(f"| {m} | {bits} | {ref if ref is not None else '—'} | {_cell(rtn, ref)} | "
                       f"{_cell(eptq, ref)} | {t} | {rss} |")
    ablated = {(r["model"], r["bits"]) for r in rows if r["method"] in LABELS and r["method"] not in ("rtn", "eptq")}
    abl = [r for r in rows if r["method"] in LABELS and r["method"] != "rtn" and (r["model"], r["bits"]) in ablated]
    if abl:
        out += ["", "### Ablations (same seed, same calibration images, same budget unless stated)", "",
                "| model | bits | variant | top-1 | time | peak RSS |", "|---|---|---|---:|---:|---:|"]
        for r in sorted(abl, key=lambda r: (r["model"], r["bits"], list(LABELS).index(r["method"]))):
            ref = by.get((r["model"], "float", "FP32"), {}).get("top1")
            out.append(f"| {r['model']} | {r['bits']} | {LABELS[r['method']]} | {_cell(r, ref)} | "
                       f"{r['quantize_s']:.0f} s | "
                       f"{r['peak_rss_mib']:.0f} MiB |")
    reseeded = {(r["model"], r["method"], r["bits"]) for r in all_rows if r.get("seed") and r["method"] != "float"}
    if reseeded:
        out += ["", "### Seed spread (same calibration images; the seed drives the Hessian probes and the "
                "reconstruction batches)", "", "| model | bits | variant | top-1 by seed |", "|---|---|---|---|"]
        for key in sorted(reseeded):
            runs = sorted((r.get("seed", 0), r["top1"]) for r in all_rows
                          if (r["model"], r["method"], r["bits"]) == key)
            out.append(f"| {key[0]} | {key[2]} | {LABELS.get(key[1], key[1])} | "
                       + ", ".join(f"{t:.2f} (seed {sd})" for sd, t in runs) + " |")
    out += ["", "Commands (from the repository root; the `*_main` runs were stopped after their RTN rows to free the "
            "cores, their EPTQ rows come from the `*_eptq` runs; a dash is a setting not run yet):", ""]
    out += [f"- `{c}`" for c in commands]
    out += [f"- `python -m benchmarks.eptq_report {' '.join(sys.argv[1:])}` (this section)", "",
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, no GPU; "
            f"{', '.join(f'{k} {v}' for k, v in machine.get('versions', {}).items())}. Other jobs shared the "
            "cores during these runs, so times are upper bounds."]
    return "\n".join(out) + "\n"


def main(names: list[str]) -> None:
    text = section(*_load(names))
    path = REPO_ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(old, text, TITLE))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
