"""Outputs of benchmarks/compare.py: raw JSON, the "## Comparison" section of BENCHMARKS.md, a PNG plot."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

SECTION_TITLE = "## Comparison"
DATASET_NAMES = {"cifar10": "CIFAR-10 (JPEG copy)", "fashion_mnist": "Fashion-MNIST"}
METHOD_NOTES = {
    "rtn": "eptq_fx, round-to-nearest (no reconstruction)",
    "eptq": "eptq_fx, EPTQ (Hessian-weighted reconstruction)",
    "eptq_fast": "eptq_fx, EPTQ fast preset (fewer reconstruction steps)",
    "mct_ptq": "Sony MCT PTQ",
    "mct_gptq": "Sony MCT GPTQ (MCT's EPTQ)",
    "torchao_fx": "torch.ao FX static PTQ, x86 int8",
    "torchao_pt2e": "torchao PT2E, X86InductorQuantizer",
}


def machine_description() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("torch", "model-compression-toolkit", "torchao", "torchvision"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": "none" if not torch.cuda.is_available() else "present",
            "python": platform.python_version(), "versions": versions}


def _key(row: dict) -> tuple:
    return row.get("model"), row.get("method"), row.get("bits"), row.get("quick")


def _merge(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    new_keys = {_key(r) for r in new_rows}
    return [r for r in old_rows if _key(r) not in new_keys] + new_rows


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _float_top1(rows: list[dict], model: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["method"] == "float" and r.get("top1") is not None:
            return r["top1"]
    return None


def _note(row: dict) -> str:
    d = row.get("details") or {}
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason')}".replace("|", "/").replace("\n", " ")[:200]
    if row["method"] == "mct_gptq" and "n_epochs" in d:
        note = f"{d['n_epochs']} epochs x {d.get('steps_per_epoch')} steps"
        if d.get("s_per_step"):
            note += f", {d['s_per_step']:.2f} s/step wall ({d.get('cpu_s_per_step', 0):.2f} s CPU)"
        if d.get("before_first_step_s"):
            note += f", {_fmt_seconds(d['before_first_step_s'])} before the first step (PTQ + Hessians)"
        return note
    if row["method"] in ("eptq", "eptq_fast") and "iters" in d:
        return f"{d['iters']} steps/block"
    if row["method"] == "mct_ptq" and d.get("weight_bits_used"):
        return f"MCT bits used: W{d['weight_bits_used']} A{d.get('act_bits_used')}"
    return ""


def _load_note(rows: list[dict]) -> str:
    loads = [x for r in rows for x in (r.get("load_avg_1min") or []) if x is not None]
    if not loads:
        return ""
    return (f" 1-minute load average around the quantization calls: {min(loads):.1f} to {max(loads):.1f}"
            + (" (the cores were shared with other jobs, so wall times are pessimistic)." if max(loads) > 2.5
               else "."))


def _table_order(rows: list[dict]) -> list[dict]:
    """Grouped by bit setting (in first-seen order), then methods in METHOD_NOTES order."""
    bit_order = list(dict.fromkeys(r["bits"] for r in rows))
    method_order = list(METHOD_NOTES)
    return sorted(rows, key=lambda r: (bit_order.index(r["bits"]), method_order.index(r["method"])
                                       if r["method"] in method_order else len(method_order)))


def markdown_section(rows: list[dict], commands: list[str], machine: dict) -> str:
    v = machine["versions"]
    lines = [SECTION_TITLE, "",
             "eptq_fx against its peers, each (model, method, bits) quantized in a fresh process from the same "
             "float model with the same seeded calibration images, scored by top-1 on the test split. Time: "
             "wall clock of the quantization call alone (no evaluation); CPU time: the same call's process CPU "
             "time over all threads (up to 2x wall with 2 threads; steadier than wall time when other "
             "processes share the machine, see the 1-min load averages in the JSON). Peak RSS: the whole "
             "process (model, data, quantization, evaluation). Drop: float minus quantized, in points.", "",
             f"Machine: {machine['cores']} CPU cores ({machine['cpu']}), no GPU; torch {v.get('torch')}, "
             f"MCT {v.get('model-compression-toolkit')}, torchao {v.get('torchao')}." + _load_note(rows), "",
             "Command" + ("s" if len(commands) > 1 else "") + ":", ""]
    lines += [f"    {c}" for c in commands] + [""]
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = _table_order([r for r in rows if r["model"] == model and r["method"] != "float"])
        float_top1 = _float_top1(rows, model)
        first = next(r for r in rows if r["model"] == model)
        n_test = next((r.get("n_test") for r in rows if r["model"] == model and r.get("n_test")), None)
        dataset = DATASET_NAMES.get(first.get("dataset"), first.get("dataset"))
        float_text = f"{float_top1:.2f}%" if float_top1 is not None else "n/a"
        lines += [f"### {model}: {dataset}, float top-1 {float_text}"
                  f" ({n_test} test images, {first.get('n_calib')} calibration images"
                  + (", quick smoke-test budgets" if first.get("quick") else "") + ")", "",
                  "| bits | method | top-1 (%) | drop (pp) | wall time | CPU time | peak RSS (MiB) | notes |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in model_rows:
            top1 = r.get("top1")
            drop = float_top1 - top1 if (top1 is not None and float_top1 is not None) else None
            ok = r["status"] == "ok"
            rss = r.get("peak_rss_mib") if ok else None
            wall, cpu = (r.get("quantize_s"), r.get("quantize_cpu_s")) if ok else (None, None)
            lines.append(f"| {r['bits']} | {r['method']} | {'–' if top1 is None else f'{top1:.2f}'} | "
                         f"{'–' if drop is None else f'{drop:+.2f}'} | {_fmt_seconds(wall)} | {_fmt_seconds(cpu)} | "
                         f"{'–' if rss is None else f'{rss:.0f}'} | {_note(r)} |")
        lines.append("")
    lines += ["Methods: " + "; ".join(f"`{k}` = {v}" for k, v in METHOD_NOTES.items()) + ".", ""]
    return "\n".join(lines)


def replace_section(text: str, section: str, title: str = SECTION_TITLE, keep_from: str | None = None) -> str:
    """``text`` with its ``title`` section (up to the next level-2 heading) replaced by ``section``;
    appended when absent. Other sections are left exactly as they were. ``keep_from``: the old section's lines
    from the first one starting with it (a hand-written reading below generated tables) are kept after
    ``section``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept = next((lines[i:end] for i in range(start + 1, end) if keep_from and lines[i].startswith(keep_from)), [])
    kept = [""] + kept if kept else []
    while kept and not kept[-1].strip():
        kept.pop()
    new_lines = (lines[:start] + section.rstrip("\n").splitlines() + kept + ([""] if end < len(lines) else [])
                 + lines[end:])
    return "\n".join(new_lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        float_top1 = _float_top1(rows, model)
        quant = [r for r in rows if r["model"] == model and r["method"] != "float"]
        bit_order = list(dict.fromkeys(r["bits"] for r in quant))
        for method in dict.fromkeys(r["method"] for r in quant):
            points = [(bit_order.index(r["bits"]), float_top1 - r["top1"]) for r in quant
                      if r["method"] == method and r.get("top1") is not None and float_top1 is not None]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=method)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(bit_order)), bit_order)
        ax.set_xlabel("bit width")
        ax.set_ylabel("top-1 drop vs float (points)")
        ax.set_title(f"{model} (float {float_top1:.2f}%)" if float_top1 is not None else model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def earlier_results(stem: Path, command: str) -> tuple[list[dict], list[str]]:
    """Rows and commands already in ``<stem>.json`` (for ``--merge``); this command is left out."""
    path = stem.with_suffix(".json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    return old.get("results", []), [c for c in old.get("commands", []) if c != command]


def write_json(rows: list[dict], command: str, stem: Path,
               earlier: tuple[list[dict], list[str]] = ([], [])) -> Path:
    """Write ``<stem>.json``: this run's ``rows`` plus the ``earlier`` rows of settings this run did not redo."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    old_rows, old_commands = earlier
    payload = {"commands": old_commands + [command], "machine": machine_description(),
               "results": _merge(old_rows, rows)}
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    return json_path


def write_report(stem: Path, markdown_path: str | None) -> list[Path]:
    """The plot ``<stem>.png`` and (optionally) the Comparison section of ``markdown_path``, from
    ``<stem>.json``."""
    data = json.loads(stem.with_suffix(".json").read_text())
    rows, commands, machine = data["results"], data["commands"], data["machine"]
    png_path = stem.with_suffix(".png")
    plot(rows, png_path)
    written = [stem.with_suffix(".json"), png_path]
    if markdown_path is not None:
        md = Path(markdown_path)
        text = md.read_text() if md.is_file() else "# Benchmarks\n"
        md.write_text(replace_section(text, markdown_section(rows, commands, machine)))
        written.append(md)
    return written


def combine(names: list[str], out: str, markdown_path: str | None, methods: tuple[str, ...] | None = None,
            results_dir: Path | None = None) -> list[Path]:
    """Merge the results of several compare.py runs (``benchmarks/results/<name>.json``; a later file wins for
    the same model/method/bits) into ``<out>.json`` and rewrite the report from it. ``methods``: keep only
    these (the float rows always stay)."""
    results_dir = results_dir or Path(__file__).resolve().parent / "results"
    rows: list[dict] = []
    commands: list[str] = []
    machine = None
    for name in names:
        data = json.loads((results_dir / f"{name}.json").read_text())
        kept = [r for r in data["results"] if methods is None or r["method"] in ("float", *methods)]
        rows = _merge(rows, kept)
        commands += [c for c in data["commands"] if c not in commands]
        machine = machine or data.get("machine")
    stem = results_dir / out
    stem.with_suffix(".json").write_text(json.dumps(
        {"commands": commands, "machine": machine or machine_description(), "results": rows}, indent=1,
        default=str))
    return write_report(stem, markdown_path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Merge compare.py results and rewrite the Comparison section.")
    parser.add_argument("names", nargs="+", help="result names under benchmarks/results, later ones win")
    parser.add_argument("--out", default="compare")
    parser.add_argument("--markdown", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    parser.add_argument("--methods", default=",".join(METHOD_NOTES), help="methods to keep (default: the "
                        "Comparison table's; the EPTQ ablations have their own section, see eptq_report.py)")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for path in combine(args.names, args.out, None if args.markdown == "none" else args.markdown, methods):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
