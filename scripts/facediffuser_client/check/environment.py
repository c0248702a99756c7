"""The first-run check's environment: the Python it runs under (ComfyUI's, or plainly not), ComfyUI and its version,
what ComfyUI imports at start (its requirements, probed by comfyui_requirements_probe.py in a process of this Python),
and torch with the device it will use."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import comfyui_python
from ..pack import PACK_ROOT
from .findings import INFO, MISSING, OK, PROBLEM, Finding

MIN_COMFYUI = (0, 17, 0)
MIN_PYTHON = (3, 10)

REQUIREMENTS = "ComfyUI's requirements"
REQUIREMENTS_PROBE = Path(__file__).with_name("comfyui_requirements_probe.py")
REQUIREMENTS_PROBE_TIMEOUT_S = 600.0
NOT_INSTALLED = "not installed"  # the probe's word for a requirement without its distribution
# Written in a command in place of this Python when this one is plainly not ComfyUI's: never advise installing into it.
COMFYUIS_PYTHON = "<ComfyUI's python>"


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_python(found: str, not_installed: list[str], essential: int, script: str) -> Finding:
    """This Python: ComfyUI's when it was found beside ComfyUI or named (`found` says how); otherwise plainly not
    ComfyUI's when torch, or half of what ComfyUI needs to start (`essential` packages), is not installed in it."""
    version = ".".join(map(str, sys.version_info[:3]))
    where = f"{version} at {sys.executable}"
    if sys.version_info[:2] < MIN_PYTHON:
        return Finding(PROBLEM, "Python", where, f"Face-diffuser needs Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    if found:
        return Finding(OK, "Python", f"{where} (ComfyUI's: {found})")
    if "torch" in not_installed or (essential and 2 * len(not_installed) >= essential):
        listed = f"{', '.join(not_installed[:6])}{', ...' if len(not_installed) > 6 else ''}"
        lacking = (f"{len(not_installed)} of the {essential} packages ComfyUI needs to start are not installed in it ({listed})"
                   if essential else "torch is not installed in it")
        return Finding(
            PROBLEM, "Python",
            f"{where}: {lacking}, so it is not the Python that runs ComfyUI, and none was found beside ComfyUI (venv/, .venv/, "
            f"python_embeded/)",
            f"run this with the Python that runs ComfyUI (`<its python> scripts/{script}.py`), or name it: "
            f"{comfyui_python.OPTION} <its python, or its venv or conda environment's folder>")
    return Finding(OK, "Python", where)


def torchvision_fix(torch_version: str | None, python: str) -> str:
    """The torchvision built for this torch: torch 2.N pairs with torchvision 0.(N+15), from the index torch came
    from (its local version: +cpu, +cu124, ...); a torchvision from elsewhere lacks its C++ operators for this torch."""
    match = re.fullmatch(r"2\.(\d+)\.(\d+)(?:\+(\w+))?", torch_version or "")
    if match is None:
        return f"install the torchvision built for your torch ({torch_version}): pytorch.org's install selector gives the command"
    minor, patch, build = match.groups()
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    return (f"install the torchvision built for torch {torch_version}, from the index torch came from: "
            f"`{python} -m pip install --force-reinstall --no-deps torchvision==0.{int(minor) + 15}.{patch}{index}`")


@dataclass
class RequirementsProbe:
    """What comfyui_requirements_probe.py said in a process of this Python: each requirement -> "" when it imports,
    NOT_INSTALLED, or its error; torch's version; or, when the probe itself failed, why."""
    requirements_txt: Path
    results: dict[str, str]
    torch_version: str | None = None
    failure: str = ""

    @property
    def not_installed(self) -> list[str]:
        return [name for name, why in self.results.items() if why == NOT_INSTALLED]


def probe_comfyui_requirements(root: Path | None) -> RequirementsProbe | None:
    """What ComfyUI imports at start (its requirements.txt above '#non essential'), imported in a process of this
    Python; None without a requirements.txt."""
    requirements_txt = root / "requirements.txt" if root is not None else None
    if requirements_txt is None or not requirements_txt.is_file():
        return None
    try:
        probe = subprocess.run([sys.executable, str(REQUIREMENTS_PROBE), str(requirements_txt)], capture_output=True, text=True,
                               timeout=REQUIREMENTS_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return RequirementsProbe(requirements_txt, {}, failure=f"{type(error).__name__}: {error}")
    try:
        answer = json.loads(probe.stdout.strip().splitlines()[-1])
        return RequirementsProbe(requirements_txt, answer["requirements"], answer["torch"])
    except (ValueError, IndexError, KeyError, TypeError):
        return RequirementsProbe(requirements_txt, {}, failure=probe.stderr.strip()[-500:] or f"exit status {probe.returncode}")


def check_comfyui_requirements(probe: RequirementsProbe, python: str) -> Finding:
    if probe.failure:
        return Finding(PROBLEM, REQUIREMENTS, f"importing them in {sys.executable} failed: {probe.failure}",
                       f"reinstall ComfyUI's requirements: `{python} -m pip install -r {probe.requirements_txt}`")
    broken = {name: why for name, why in probe.results.items() if why and why != NOT_INSTALLED}
    if not probe.not_installed and not broken:
        return Finding(OK, REQUIREMENTS, f"the {len(probe.results)} packages ComfyUI needs to start import ({probe.requirements_txt})")
    problems = [f"{name} {NOT_INSTALLED}" for name in probe.not_installed] + [f"{name} ({why})" for name, why in broken.items()]
    fixes = [f"install them: `{python} -m pip install -r {probe.requirements_txt}`"] if probe.not_installed else []
    if "torchvision::" in broken.get("torchvision", ""):
        fixes.append(torchvision_fix(probe.torch_version, python))
        del broken["torchvision"]
    if broken:
        fixes.append(f"reinstall what does not import: `{python} -m pip install --force-reinstall {' '.join(sorted(broken))}`")
    return Finding(PROBLEM, REQUIREMENTS, f"some of the packages ComfyUI needs to start do not import in {sys.executable}: "
                                          f"{'; '.join(problems)}", "; ".join(fixes))


def check_comfyui(root: Path | None, explicit: Path | None) -> Finding:
    if root is None:
        where = f"{explicit} has no comfyui_version.py" if explicit else (
            f"this pack is not inside ComfyUI/custom_nodes ({PACK_ROOT}) and COMFYUI_PATH is not set")
        return Finding(MISSING, "ComfyUI", where,
                       "install the pack into ComfyUI/custom_nodes (see README 'Install'), or pass --comfyui <ComfyUI folder>")
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", (root / "comfyui_version.py").read_text(errors="replace"))
    version = match.group(1) if match else "unknown"
    if not match or parse_version(version) < MIN_COMFYUI:
        return Finding(PROBLEM, "ComfyUI", f"version {version} at {root}",
                       f"update ComfyUI to {'.'.join(map(str, MIN_COMFYUI))} or newer (git pull, or ComfyUI-Manager > Update ComfyUI)")
    return Finding(OK, "ComfyUI", f"{version} at {root}")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> tuple[Finding, bool]:
    """The torch finding, and whether a CUDA GPU is usable (then onnxruntime should use it too)."""
    try:
        import torch
    except Exception as error:  # a broken CUDA install raises OSError, not ImportError
        return Finding(MISSING, "torch", f"cannot import torch ({type(error).__name__}: {error})",
                       "install ComfyUI's requirements with the Python that runs ComfyUI (see ComfyUI's README for the "
                       "torch build that matches your GPU)"), False
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return Finding(OK, "torch", f"{torch.__version__}, device CUDA {torch.version.cuda}: {name}, {memory:.0f} GiB"), True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Finding(OK, "torch", f"{torch.__version__}, device MPS (Apple GPU)"), False
    return Finding(INFO, "torch", f"{torch.__version__}, device CPU only (no CUDA or MPS GPU found)",
                   "CPU works but takes minutes per image; with an NVIDIA GPU install a CUDA build of torch"), False
