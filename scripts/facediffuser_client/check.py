"""The first-run check's findings: the Python it runs under (ComfyUI's, or plainly not), ComfyUI and its version, what
ComfyUI imports at start (its requirements, probed in a process of ComfyUI's Python), torch and its device,
insightface and onnxruntime (the execution providers that actually work, conflicting builds), and every model file,
each with the fix when it is not in place. It only reads, and needs nothing but the standard library, so that it also
runs, and says what is missing, on a bare Python (torch, insightface and onnxruntime are imported only to be checked).
"""

from __future__ import annotations

import importlib.metadata
import json
import pickletools
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import comfyui_python
from .pack import PACK_ROOT, core

packs, model_folders = core("insightface_packs"), core("model_folders")

MIN_COMFYUI = (0, 17, 0)
MIN_PYTHON = (3, 10)

# Canonical file names in <models>/facediffuser, the names the shipped workflows use: the converted
# safetensors first, then the official download renamed.
SDM_FILES = ("facediffuser_sdm.safetensors", "facediffuser_sdm.bin")
TDM_FILES = ("facediffuser_tdm.safetensors", "facediffuser_tdm.bin")
SDM_SOURCE = ("SDM/pytorch_model.bin of the official release, https://huggingface.co/CodeGoat24/Face-diffuser/tree/main/SDM "
              "(FastComposer's pytorch_model.bin, https://huggingface.co/mit-han-lab/fastcomposer, has the same layout and works too)")
TDM_SOURCE = "TDM/pytorch_model.bin of the official release, https://huggingface.co/CodeGoat24/Face-diffuser/tree/main/TDM"
# The checkpoint kinds (facediffuser_core.checkpoint.CheckpointKind names) each loader accepts.
SDM_KINDS = ("SDM",)
TDM_KINDS = ("TDM", "SD15")

# Distributions that all install the same `onnxruntime` package and overwrite each other's files.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn")

OK, MISSING, PROBLEM, INFO = "ok", "missing", "problem", "info"

REQUIREMENTS = "ComfyUI's requirements"
REQUIREMENTS_PROBE = Path(__file__).with_name("comfyui_requirements_probe.py")
REQUIREMENTS_PROBE_TIMEOUT_S = 600.0
NOT_INSTALLED = "not installed"  # the probe's word for a requirement without its distribution
# Written in a command in place of this Python when this one is plainly not ComfyUI's: never advise installing into it.
COMFYUIS_PYTHON = "<ComfyUI's python>"

# What every shipped workflow needs: a ComfyUI that starts.
BASE_NEEDS = ("Python", "ComfyUI", REQUIREMENTS, "torch")
# What each node of the shipped workflows needs in place, by the subject of the finding that reports it.
NODE_NEEDS = {
    "FaceDiffuserSDMLoader": ("SDM model",),
    "FaceDiffuserTDMLoader": ("TDM model",),
    "FaceDiffuserInsightFaceLoader": ("insightface", "onnxruntime", "insightface models"),
    "FaceDiffuserIdentityScore": ("insightface recognition model",),
}


@dataclass
class Finding:
    status: str
    subject: str
    detail: str
    fix: str = ""


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- ComfyUI and Python -----------------------------------------------------------------------------------


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


# --- torch, insightface, onnxruntime ---------------------------------------------------------------------


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


def onnxruntime_build(cuda_gpu: bool) -> str:
    """The onnxruntime distribution for this machine: the GPU build only where torch sees a CUDA GPU; elsewhere
    it runs on the CPU too, but prints provider errors (CUDA, TensorRT libraries not found) at every start."""
    return "onnxruntime-gpu" if cuda_gpu else "onnxruntime"


def insightface_install_command(cuda_gpu: bool, python: str = sys.executable) -> str:
    """insightface and the one onnxruntime build this machine wants. insightface's own requirements may pull the
    CPU build, so on a CUDA machine it is swapped for the GPU build afterwards rather than installed beside it."""
    pip = f"{python} -m pip"
    if cuda_gpu:
        return f"{pip} install insightface && {pip} uninstall -y onnxruntime && {pip} install onnxruntime-gpu"
    return f"{pip} install insightface onnxruntime"


def check_insightface(cuda_gpu: bool, python: str = sys.executable) -> Finding:
    version = installed_version("insightface")
    if version is None:
        return Finding(MISSING, "insightface", "not installed (a second step after requirements.txt, README 'Install')",
                       insightface_install_command(cuda_gpu, python))
    try:
        import insightface  # noqa: F401
    except Exception as error:
        return Finding(PROBLEM, "insightface", f"{version} installed but cannot be imported ({type(error).__name__}: {error})",
                       "reinstall it with the Python that runs ComfyUI; on Windows it needs the MSVC build tools or a prebuilt wheel")
    return Finding(OK, "insightface", version)


def onnxruntime_conflict(cuda_gpu: bool, python: str = sys.executable) -> Finding | None:
    installed = [(name, installed_version(name)) for name in ONNXRUNTIME_DISTRIBUTIONS]
    installed = [(name, version) for name, version in installed if version]
    if len(installed) < 2:
        return None
    names = [name for name, _ in installed]
    keep = onnxruntime_build(cuda_gpu)
    return Finding(
        PROBLEM, "onnxruntime",
        "several builds installed at once: " + ", ".join(f"{name} {version}" for name, version in installed)
        + "; they overwrite each other's files, so which one runs is an accident",
        f"{python} -m pip uninstall -y {' '.join(names)} && {python} -m pip install {keep}",
    )


def _protobuf_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _protobuf_field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _protobuf_varint(number << 3) + _protobuf_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _protobuf_varint(number << 3 | 2) + _protobuf_varint(len(data)) + data


def identity_onnx_model() -> bytes:
    """A one-node ONNX model (Identity on a float[1]) built by hand, so that providers can be tried without
    the `onnx` package or any model file. Field numbers from onnx.proto (IR version 7, opset 13)."""
    float_tensor = _protobuf_field(1, _protobuf_field(1, 1) + _protobuf_field(2, _protobuf_field(1, _protobuf_field(1, 1))))
    node = _protobuf_field(1, "x") + _protobuf_field(2, "y") + _protobuf_field(4, "Identity")
    graph = (_protobuf_field(1, node) + _protobuf_field(2, "provider_probe")
             + _protobuf_field(11, _protobuf_field(1, "x") + _protobuf_field(2, float_tensor))
             + _protobuf_field(12, _protobuf_field(1, "y") + _protobuf_field(2, float_tensor)))
    return _protobuf_field(1, 7) + _protobuf_field(7, graph) + _protobuf_field(8, _protobuf_field(1, "") + _protobuf_field(2, 13))


def working_providers(onnxruntime) -> dict[str, str]:
    """Each available provider -> "" when a session on it runs, else why not. onnxruntime quietly falls back
    to CPU when a provider's libraries (CUDA, cuDNN) do not load, so the session's own list decides."""
    import numpy  # onnxruntime depends on it

    model = identity_onnx_model()
    results = {}
    for provider in onnxruntime.get_available_providers():
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # the fallback warning is reported below, in words
        try:
            session = onnxruntime.InferenceSession(model, options, providers=[provider])
            if provider not in session.get_providers():
                results[provider] = f"falls back to {session.get_providers()[0]}"
                continue
            (output,) = session.run(None, {"x": numpy.array([1.5], dtype=numpy.float32)})
            results[provider] = "" if float(output[0]) == 1.5 else f"computed {output[0]} instead of 1.5"
        except Exception as error:
            results[provider] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return results


def check_onnxruntime(cuda_gpu: bool, python: str = sys.executable) -> list[Finding]:
    """Conflicting builds, then whether onnxruntime imports and which providers run; with a CUDA GPU, whether
    insightface can use it."""
    findings = [conflict] if (conflict := onnxruntime_conflict(cuda_gpu, python)) else []
    if not any(installed_version(name) for name in ONNXRUNTIME_DISTRIBUTIONS):
        return findings + [Finding(MISSING, "onnxruntime", "not installed (insightface's face detector runs on it)",
                                   f"{python} -m pip install {onnxruntime_build(cuda_gpu)}")]
    try:
        import onnxruntime
    except Exception as error:
        return findings + [Finding(PROBLEM, "onnxruntime", f"installed but cannot be imported ({type(error).__name__}: {error})",
                                   "uninstall every onnxruntime build and install one (docs/troubleshooting.md)")]
    providers = working_providers(onnxruntime)
    working = [name for name, problem in providers.items() if not problem]
    failing = [f"{name} ({problem})" for name, problem in providers.items() if problem]
    detail = f"{onnxruntime.__version__}, providers that work: {', '.join(working) or 'none'}"
    if failing:
        detail += f"; not working: {'; '.join(failing)}"
    if not working:
        return findings + [Finding(PROBLEM, "onnxruntime", detail, "reinstall onnxruntime (docs/troubleshooting.md)")]
    if cuda_gpu and "CUDAExecutionProvider" not in working:
        return findings + [Finding(
            INFO, "onnxruntime", detail,
            "face detection will run on the CPU (slower, same result). For the GPU: install onnxruntime-gpu built for "
            "your CUDA and cuDNN versions (docs/troubleshooting.md: CUDA provider not found)")]
    if not cuda_gpu and not conflict and installed_version("onnxruntime-gpu"):
        return findings + [Finding(
            INFO, "onnxruntime", detail + "; the GPU build, on a machine where torch sees no CUDA GPU",
            "it runs on the CPU but prints provider errors at every start; the CPU build is the one for this machine: "
            f"{python} -m pip uninstall -y onnxruntime-gpu && {python} -m pip install onnxruntime")]
    return findings + [Finding(OK, "onnxruntime", detail)]


# --- model files -------------------------------------------------------------------------------------------


def checkpoint_keys(path: Path) -> list[str] | None:
    """The tensor names in a .safetensors header or a zip-format torch .bin, read without loading any tensor
    (and without torch); None when the format does not allow it (legacy pickles)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        return [key for key in header if key != "__metadata__"]
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            if file.read(4) == b"PK\x03\x04":  # a zip-format torch file whose end (the zip's index) is missing
                raise zipfile.BadZipFile("a torch zip file without its end: the file is truncated")
        return None
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"), None)
        if pickle_name is None:
            return None
        data = archive.read(pickle_name)
    # The state dict's keys are the pickle's string constants; the others (storage type, device, ids) do not
    # look like tensor names and are ignored by the classification.
    return [arg for opcode, arg, _ in pickletools.genops(data)
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8") and "." in arg]


def classify_file(path: Path):
    """facediffuser_core's own classification of the file's keys, or why the kind cannot be checked here."""
    keys = checkpoint_keys(path)
    if keys is None:
        return None, "kind not checked: an old-style torch pickle, the loader reads it"
    try:
        checkpoint = core("checkpoint")
    except ImportError:
        return None, "kind not checked: needs torch"
    return checkpoint.classify(dict.fromkeys(keys)), ""


SETUP_COMMAND = "python scripts/facediffuser_setup.py"
# Written by the set-up beside the models: the files whose content it compared with the hub's hash, by name, with
# the size and mtime they had then, so that each is read in full once, and whether they were damaged.
VERIFIED_RECORD = ".facediffuser-setup-verified.json"
VERIFIED, DAMAGED, CHANGED = "verified", "damaged", "changed"


def verified_records(folder: Path) -> dict:
    try:
        return json.loads((folder / VERIFIED_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def verification(path: Path) -> str:
    """What the set-up found of the file's content: VERIFIED, DAMAGED, CHANGED since (either), or "" (never compared)."""
    record = verified_records(path.parent).get(path.name)
    if record is None:
        return ""
    if record.get("stamp") != file_stamp(path):
        return CHANGED
    return DAMAGED if record.get("damaged") else VERIFIED


def changed_since_verified(path: Path) -> bool:
    return verification(path) == CHANGED


def find_checkpoint(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    """The file the check reports on: the first name (safetensors before .bin) in the first folder holding it."""
    return next((folder / name for name in names for folder in folders if (folder / name).is_file()), None)


def check_checkpoint(folders: list[Path], role: str, names: tuple[str, ...], source: str, accepted_kinds: tuple[str, ...]) -> Finding:
    """The first of `names` found in `folders` (ComfyUI's model folders for the pack, the set-up's target first)."""
    subject = f"{role} model"
    path = find_checkpoint(folders, names)
    if path is None:
        target = folders[0]
        strays = sorted(p.name for folder in folders if folder.is_dir() for p in folder.glob("*") if p.suffix in (".bin", ".safetensors"))
        hint = f" The folder holds {', '.join(strays)}: rename the {role} file, or pick it in the loader." if strays else ""
        looked = f" (also looked in {', '.join(map(str, folders[1:]))})" if len(folders) > 1 else ""
        return Finding(MISSING, subject, f"none of {', '.join(names)} in {target}{looked}",
                       f"download {source} and save it as {target / names[-1]} (or convert it to {target / names[0]}, "
                       f"docs/setup.md 'Converting the official weights to safetensors'), or let `{SETUP_COMMAND}` download and place it.{hint}")
    size = path.stat().st_size / 2**30
    try:
        classification, unchecked = classify_file(path)
    except (OSError, ValueError, struct.error, zipfile.BadZipFile) as error:
        return Finding(PROBLEM, subject, f"{path} cannot be read ({type(error).__name__}: {error})",
                       f"the file is damaged or incomplete: download it again: {source}")
    if classification is not None and classification.kind.name not in accepted_kinds:
        return Finding(PROBLEM, subject, f"{path} is {classification.description}, not the {role}",
                       f"put the {role} there: {source}")
    what = unchecked if classification is None else classification.kind.value
    if path.name != names[-1]:  # a conversion: the converter compared it with its source
        return Finding(OK, subject, f"{path} ({size:.2f} GiB, {what})")
    found = verification(path)
    if found == CHANGED:
        return Finding(PROBLEM, subject, f"{path} changed since the set-up verified its content",
                       f"run `{SETUP_COMMAND}`: it checks the file against the hub's sha256 and says what to do")
    if found == DAMAGED:  # the set-up said so and would only say it again
        return Finding(PROBLEM, subject, f"{path} is damaged: the set-up found its content differs from the hub's",
                       f"delete {path}, then run `{SETUP_COMMAND}`: it downloads the hub's file anew")
    verified = "content verified by the set-up" if found == VERIFIED else (
        f"content not verified: `{SETUP_COMMAND}` checks it against the hub's sha256")
    return Finding(OK, subject, f"{path} ({size:.2f} GiB, {what}; {verified})")


def insightface_pack_fix(root: Path) -> str:
    """How to install the default pack into <root>/models (root: an insightface folder): by the set-up, with a zip
    fetched elsewhere when this machine cannot download it, or by hand."""
    models = root / "models"
    source = packs.PACK_SOURCES[packs.DEFAULT_PACK]
    return (f"run `{SETUP_COMMAND}`, which installs {packs.DEFAULT_PACK}; where it cannot download (offline, a proxy), "
            f"fetch {source} another way and give it the zip: `{SETUP_COMMAND} --insightface-source <the zip>`; or unzip "
            f"it yourself so that {models / packs.DEFAULT_PACK / packs.detector_file(packs.DEFAULT_PACK)} exists "
            f"(antelopev2 works too, as {models / 'antelopev2' / packs.detector_file('antelopev2')})")


def check_insightface_pack(roots: list[Path]) -> Finding:
    """A known pack in <root>/models/<pack>/ for any of the insightface folders, the set-up's target first."""
    complete, partial, nested = [], [], []
    for root in roots:
        for pack, files in packs.KNOWN_PACK_FILES.items():
            folder = root / "models" / pack
            detector = packs.detector_file(pack)
            if (folder / detector).is_file():
                complete.append(f"{pack} in {root / 'models'}")
            elif (folder / pack).is_dir() and not any((folder / name).is_file() for name in files):
                nested.append(folder)
            elif folder.is_dir():
                partial.append(f"{folder} lacks its face detector {detector}")
    if complete:
        return Finding(OK, "insightface models", ", ".join(complete))
    if nested:
        folder = nested[0]
        return Finding(PROBLEM, "insightface models", f"{folder / folder.name} is nested one level too deep",
                       f"move the files of {folder / folder.name} up into {folder} and delete the empty inner folder")
    zips = sorted(str(p) for root in roots for p in (root / "models").glob("*.zip"))
    detail = "; ".join(partial) if partial else f"no {' or '.join(packs.KNOWN_PACK_FILES)} folder in {', '.join(str(r / 'models') for r in roots)}"
    fix = insightface_pack_fix(roots[0])
    if zips:
        fix = f"unzip {', '.join(zips)} where it lies; " + fix
    return Finding(MISSING, "insightface models", detail, fix)


def auto_pack(roots: list[Path]) -> tuple[str, Path] | None:
    """The pack the InsightFace Loader's `auto` takes: the first known pack, in KNOWN_PACK_FILES order, with .onnx
    files in its folder (nodes/insightface_loader.py resolve_auto_pack)."""
    for pack in packs.KNOWN_PACK_FILES:
        for root in roots:
            folder = root / "models" / pack
            if any(folder.glob("*.onnx")):
                return pack, folder
    return None


def check_recognition_model(roots: list[Path]) -> Finding | None:
    """The Identity Score node's face recognition model in the pack `auto` takes; None when there is no pack (the
    pack's own finding says what to do)."""
    chosen = auto_pack(roots)
    if chosen is None:
        return None
    pack, folder = chosen
    subject = "insightface recognition model"
    name = packs.recognition_file(pack)
    if (folder / name).is_file():
        return Finding(OK, subject, f"{folder / name} (the Identity Score node's)")
    if pack == packs.DEFAULT_PACK:
        fix = (f"run `{SETUP_COMMAND}`, which completes {pack} from its zip (where it cannot download: `{SETUP_COMMAND} "
               f"--insightface-source <the zip>`), or download {packs.PACK_SOURCES[pack]} and unzip its {name} into {folder}")
    else:
        fix = (f"put {name} from the {pack} zip into {folder} (`{SETUP_COMMAND} --insightface-pack {pack} "
               f"--insightface-source <the zip>` does it)")
    return Finding(MISSING, subject, f"{pack} in {folder} has no {name}: only face detection works, the Identity "
                                     f"Score node cannot run", fix)


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


# --- the report --------------------------------------------------------------------------------------------


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


def to_do(findings: list[Finding]) -> list[Finding]:
    """The findings that need the user's action; the check and the set-up end with status 1 while there are any."""
    return [f for f in findings if f.status in (MISSING, PROBLEM)]


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
