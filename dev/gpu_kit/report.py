"""The kit's results: gpu-kit.json (every figure, each measurement with what it was measured with) and gpu-kit.md
(one summary table, whose rows the documentation's GPU table takes, then the benchmark's own tables)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dev.benchmarks.report import as_json

JSON_NAME, MARKDOWN_NAME, LOG_NAME = "gpu-kit.json", "gpu-kit.md", "gpu-kit.log"


def write_whole(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def error_in_a_line(error: str) -> str:
    """A traceback's last line (the exception), else the first (the conductor's own account)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def heading(labels: dict) -> str:
    cuda = f" (CUDA {labels['cuda']})" if labels.get("cuda") else ""
    return f"{labels.get('device', 'unknown device')}, torch {labels.get('torch', '?')}{cuda}, ComfyUI {labels.get('comfyui', '?')}"


def markdown(run: dict) -> str:
    kit = run["kit"]
    labels = next((m["labels"] for m in run["measurements"] if m.get("labels")), {})
    lines = [
        f"# GPU kit: {heading(labels)}" if labels else "# GPU kit: no worker started",
        "",
        f"`{kit['command']}`, {kit['started']}, {kit['seconds']:.0f} s" + (f" of its {kit['deadline_s']:.0f} s" if kit["deadline_s"] else "")
        + f"; the pack at {kit['commit']}" + ("; sizes: the CPU rehearsal's (tiny), not a measurement" if kit["tiny"] else "") + ".",
    ]
    described = [f"{what} {labels[key]}{after}" for key, what, after in (
        ("python", "Python", ""), ("dynamic_vram", "dynamic VRAM", ""), ("patcher", "patcher", ""),
        ("attention", "attention", " (regions rows name their own)")) if labels.get(key)]
    if labels.get("stand_ins"):
        described.append(f"stand-ins for {', '.join(labels['stand_ins'])} (not installed)")
    if described:
        lines.append(f"Every figure: {'; '.join(described)}.")
    lines += ["", "| measure | Face-diffuser | KSampler / reference | ratio | goal |", "|---|---|---|---|---|"]
    for measurement in run["measurements"]:
        status = measurement["status"]
        title = f"**{measurement['name']}**" + (f" ({measurement['worker']})" if measurement["worker"] != "PyTorch SDPA" else "")
        if status == "ok":
            lines.append(f"| {title}: {measurement['seconds']:.1f} s | | | | |")
            lines += [f"| {r['measure']} | {r['value']} | {r['reference']} | {r['ratio']} | {r['goal']} |" for r in measurement["rows"]]
        else:
            lines.append(f"| {title}: {status}: {error_in_a_line(measurement.get('error', ''))} | | | | |")
    for measurement in run["measurements"]:
        if measurement.get("tables"):
            lines += ["", f"## {measurement['name']} ({measurement['worker']})", "", *("\n\n".join(measurement["tables"]).splitlines())]
    failures = [m for m in run["measurements"] if m["status"] != "ok"]
    if failures:
        lines += ["", "## What did not run", ""]
        for measurement in failures:
            lines += [f"{measurement['name']} ({measurement['worker']}): {measurement['status']}", "", *(
                "    " + line for line in measurement.get("error", "").strip().splitlines())]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write(out: Path, run: dict) -> Path:
    write_whole(out / JSON_NAME, json.dumps(run, indent=1, default=as_json) + "\n")
    write_whole(out / MARKDOWN_NAME, markdown(run))
    return out / MARKDOWN_NAME
