"""The first-run check of the model files: the SDM and TDM checkpoints (of the right kind, read without loading
them, and what the set-up found of their content), the insightface packs and the Identity Score's recognition model."""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from pathlib import Path

from ..pack import core
from ..verified_records import CHANGED, DAMAGED, VERIFIED, verification
from .findings import MISSING, OK, PROBLEM, Finding

packs = core("insightface_packs")

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

SETUP_COMMAND = "python scripts/facediffuser_setup.py"


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
