"""The first-run check's report: every finding in order, which shipped workflows they block, the first-picture
command, and the text printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..pack import PACK_ROOT, core
from .environment import (COMFYUIS_PYTHON, REQUIREMENTS, check_comfyui, check_comfyui_requirements, check_python, check_torch,
                          installed_version, probe_comfyui_requirements)
from .findings import INFO, MISSING, OK, PROBLEM, Finding, to_do
from .insightface_onnxruntime import check_insightface, check_onnxruntime
from .model_files import (SDM_FILES, SDM_KINDS, SDM_SOURCE, TDM_FILES, TDM_KINDS, TDM_SOURCE, check_checkpoint, check_insightface_pack,
                          check_recognition_model)

model_folders = core("model_folders")

# What every shipped workflow needs: a ComfyUI that starts.
BASE_NEEDS = ("Python", "ComfyUI", REQUIREMENTS, "torch")
# What each node of the shipped workflows needs in place, by the subject of the finding that reports it.
NODE_NEEDS = {
    "FaceDiffuserSDMLoader": ("SDM model",),
    "FaceDiffuserTDMLoader": ("TDM model",),
    "FaceDiffuserInsightFaceLoader": ("insightface", "onnxruntime", "insightface models"),
    "FaceDiffuserIdentityScore": ("insightface recognition model",),
}


def shipped_workflows() -> dict[str, set[str]]:
    """Each shipped API workflow -> the subjects of the findings it needs to be OK (by its node types)."""
    needs = {}
    for path in sorted((PACK_ROOT / "workflows" / "api").glob("*.json")):
        nodes = json.loads(path.read_text(encoding="utf-8")).values()
        needs[path.stem] = {*BASE_NEEDS, *(subject for node in nodes for subject in NODE_NEEDS.get(node["class_type"], ()))}
    return needs


def blocked_workflows(findings: list[Finding]) -> dict[str, list[str]]:
    """Each shipped workflow that cannot run yet -> the subjects it lacks."""
    lacking = {f.subject for f in to_do(findings)}
    blocked = {}
    for name, needs in shipped_workflows().items():
        if lacking & needs:
            blocked[name] = sorted(lacking & needs)
    return blocked


def runner_command(findings: list[Finding]) -> str:
    """The first-picture command. On a CPU-only torch the runner passes --cpu to the ComfyUI it starts by itself;
    the command asks for a smaller picture in fewer steps there, at most a tenth of the shipped size's sampling work."""
    cpu_only = any(f.subject == "torch" and "CPU only" in f.detail for f in findings)
    smaller = " --steps 20 --width 256 --height 256" if cpu_only else ""
    return f'python scripts/facediffuser_run.py --face <photo> --prompt "a photo of a man <|image|> hiking in the alps"{smaller}'


def run_checks(comfyui: Path | None, models_dir: Path | None, extra_model_paths: tuple[Path, ...] = (),
               python_found: str = "", script: str = "facediffuser_check") -> list[Finding]:
    """Every finding, in the report's order. `python_found`: how this Python was found to be ComfyUI's ("": it was
    not); `script`: the command that runs the check, for the fix that names it."""
    root = model_folders.find_comfyui(comfyui)
    probe = probe_comfyui_requirements(root)
    if probe is not None and not probe.failure:
        python_finding = check_python(python_found, probe.not_installed, len(probe.results), script)
    else:
        python_finding = check_python(python_found, [] if installed_version("torch") else ["torch"], 0, script)
    python = sys.executable if python_finding.status == OK else COMFYUIS_PYTHON
    torch_finding, cuda_gpu = check_torch()
    findings = [python_finding, check_comfyui(root, comfyui), *([check_comfyui_requirements(probe, python)] if probe else []),
                torch_finding, check_insightface(cuda_gpu, python), *check_onnxruntime(cuda_gpu, python)]
    if models_dir is None and root is None:
        findings.append(Finding(MISSING, "model files", "no models folder: ComfyUI was not found",
                                "pass --models-dir <ComfyUI>/models (or --comfyui) to check the model files"))
        return findings
    try:
        folders = model_folders.ModelFolders.of(root, models_dir, extra_model_paths)
    except model_folders.ExtraModelPathsError as error:
        findings.append(Finding(PROBLEM, "extra_model_paths.yaml", str(error), "fix the file, as ComfyUI cannot read it either"))
        folders = model_folders.ModelFolders.of(None, models_dir or root / "models")
    facediffuser = folders.search("facediffuser")
    findings.append(check_checkpoint(facediffuser, "SDM", SDM_FILES, SDM_SOURCE, SDM_KINDS))
    findings.append(check_checkpoint(facediffuser, "TDM", TDM_FILES, TDM_SOURCE, TDM_KINDS))
    findings.append(check_insightface_pack(folders.search("insightface")))
    if (recognition := check_recognition_model(folders.search("insightface"))) is not None:
        findings.append(recognition)
    return findings


LABELS = {OK: "[  ok   ]", MISSING: "[missing]", PROBLEM: "[problem]", INFO: "[ note  ]"}


def render(findings: list[Finding]) -> str:
    lines = ["Face-diffuser first-run check", ""]
    lines += [f"{LABELS[f.status]} {f.subject}: {f.detail}" for f in findings]
    lacking = to_do(findings)
    lines.append("")
    if lacking:
        lines.append("What to do next:")
        lines += [f"  {number}. {f.subject}: {f.fix}" for number, f in enumerate(lacking, 1)]
        lines.append("  Then run this check again.")
        blocked = blocked_workflows(findings)
        ready = [name for name in shipped_workflows() if name not in blocked]
        lines += ["", "Shipped workflows:"] + [f"  {name}: needs {', '.join(lacks)}" for name, lacks in blocked.items()]
        if ready:
            lines.append(f"  ready: {', '.join(ready)}")
    else:
        cpu_only = any(f.subject == "torch" and "CPU only" in f.detail for f in findings)
        started = ("it starts ComfyUI if none runs, with --cpu for this CPU-only torch; a CPU is slow, and this picture is at "
                   "most a tenth of the work of the shipped 512 px and 50 steps") if cpu_only else "it starts ComfyUI if none runs"
        lines.append(f"All set. Every shipped workflow can run; make a first picture: {runner_command(findings)} ({started}). "
                     "Or start ComfyUI and open the template browser (Workflow > Browse Templates > Face-diffuser): "
                     "facediffuser_single_subject.")
    notes = [f for f in findings if f.status == INFO and f.fix]
    if notes:
        lines += ["", "Notes:"] + [f"  - {f.subject}: {f.fix}" for f in notes]
    return "\n".join(lines)
