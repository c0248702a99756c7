"""Prepares, on this machine, everything the GPU kit carries to a GPU machine that reaches no network:

    python -m dev.gpu_kit.prepare --comfyui ~/ComfyUI

writes .gpu-kit/ at the repository's root (git ignores it): comfyui/, the ComfyUI checkout without what the kit
never loads (its tests, API nodes, blueprints, the tokenizers of text encoders SD1.5 does not use); wheels/, the
packages the GPU image lacks (image.CARRIED), for Python 3.12 on x86-64 Linux, fetched by pip from its usual
index (pip's own settings and PIP_* variables apply); manifest.json, what was prepared and what it weighs with
the working tree, which must stay under the 64 MiB that travel. The folder appears whole or not at all: it is
built beside and renamed into place, and an interruption leaves the previous one as it was. Standard library
only (it runs before any environment exists)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dev.child_process import REPO_ROOT
from dev.gpu_kit import image

KIT_FOLDER = REPO_ROOT / ".gpu-kit"
MIB = 1024 ** 2

# Top-level folders of a ComfyUI checkout that its in-process start and SD1.5 sampling never read.
LEFT_OUT_FOLDERS = {".git", ".github", ".ci", "tests", "tests-unit", "blueprints", "comfy_api_nodes", "script_examples",
                    "input", "output", "temp", "user"}


class PrepareError(Exception):
    pass


def comfyui_version(checkout: Path) -> str:
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (checkout / "comfyui_version.py").read_text(encoding="utf-8")) \
        if (checkout / "comfyui_version.py").is_file() else None
    return match.group(1) if match else "unknown"


def check_checkout(checkout: Path) -> None:
    if not (checkout / "comfy" / "samplers.py").is_file() or not (checkout / "requirements.txt").is_file():
        raise PrepareError(f"--comfyui {checkout}: not a ComfyUI checkout (no comfy/samplers.py or requirements.txt); "
                           "give the folder of a ComfyUI checkout, 0.17 or newer")


def _left_out(folder: str, names: list[str], root: str) -> set[str]:
    left = {name for name in names if name == "__pycache__" or name.endswith(".pyc")}
    if os.path.samefile(folder, root):
        left |= LEFT_OUT_FOLDERS & set(names)
    elif os.path.basename(folder) == "text_encoders" and os.path.basename(os.path.dirname(folder)) == "comfy":
        left |= {name for name in names if name.endswith("_tokenizer")}  # SD1.5's CLIP reads comfy/sd1_tokenizer
    return left


def copy_comfyui(checkout: Path, target: Path) -> int:
    """The checkout without what the kit never loads; returns the copy's size in bytes."""
    shutil.copytree(checkout, target, ignore=lambda folder, names: _left_out(folder, names, str(checkout)), symlinks=True)
    return folder_bytes(target)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def requirement(carried: image.Carried, checkout: Path) -> str:
    """The requirement pip downloads: the ComfyUI checkout's or the tests' spelling of it, or the kit's own pin."""
    if carried.pinned_from == "here":
        return f"{carried.name}=={carried.pin}"
    source = checkout / "requirements.txt" if carried.pinned_from == "comfyui" else REPO_ROOT / "requirements-test.txt"
    for line in source.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and image.requirement_name(line) == image.canonical(carried.name):
            return line
    raise PrepareError(f"{source.name} names no {carried.name}, which the kit carries ({carried.why}); "
                       "update dev/gpu_kit/image.py for this ComfyUI")


def download_wheels(checkout: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
               "--python-version", image.PYTHON_VERSION, "--implementation", image.IMPLEMENTATION,
               *(f"--platform={platform}" for platform in image.PLATFORMS), "--dest", str(folder),
               *(requirement(carried, checkout) for carried in image.CARRIED)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PrepareError(f"pip could not download the wheels (exit {done.returncode}); it said:\n{done.stderr.strip()[-2000:]}\n"
                           "The wheels come from pip's index: check the network or pip's index settings (PIP_INDEX_URL)")


def leave_out(wheel: Path, members: tuple[str, ...]) -> list[str]:
    """Rewrites the wheel without `members` (and their RECORD lines); returns those it held."""
    with zipfile.ZipFile(wheel) as original:
        held = [name for name in members if name in original.namelist()]
        if not held:
            return []
        rewritten = wheel.with_name(wheel.name + ".partial")
        with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as copy:
            for item in original.infolist():
                if item.filename in held:
                    continue
                data = original.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode("utf-8").splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in held).encode("utf-8")
                copy.writestr(item, data)
    os.replace(rewritten, wheel)
    return held


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines that apply on the image."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode("utf-8").splitlines()
    required = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            spec, _, marker = line[len("Requires-Dist:"):].partition(";")
            if image.applies_on_the_image(marker):
                required.append(spec.strip())
    return required


def check_wheels(folder: Path) -> list[str]:
    """What would stop the wheels from installing and importing on the image: a wheel for another Python or
    platform, two versions of one package, a dependency neither the image nor the kit has, a package missing."""
    problems = []
    wheels = sorted(folder.glob("*.whl"))
    names = [image.canonical(image.wheel_tags(wheel.name)[0]) for wheel in wheels]
    for wheel in wheels:
        if not image.runs_on_the_image(wheel.name):
            problems.append(f"{wheel.name} does not install on CPython {image.PYTHON_VERSION}, x86-64 manylinux")
        for needed in wheel_requirements(wheel):
            name = image.requirement_name(needed)
            if name not in image.IMAGE_PACKAGES and name not in names:
                problems.append(f"{wheel.name} needs {needed}, which neither the GPU image nor the kit has")
    problems += [f"two wheels of {name}" for name in sorted(set(names)) if names.count(name) > 1]
    problems += [f"no wheel of {carried.name}" for carried in image.CARRIED if image.canonical(carried.name) not in names]
    return problems


def travelling_bytes(repo: Path) -> int:
    """What the device machine receives besides the carried paths: tracked files and untracked ones git does
    not ignore. Without git, every file but git's and the environments' (an overestimate)."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode == 0:
        paths = {repo / name for name in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if name}
        return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())
    skipped = (".git", ".venv", KIT_FOLDER.name, "__pycache__", ".pytest_cache", ".hypothesis")
    return sum(path.stat().st_size for path in repo.rglob("*")
               if path.is_file() and not any(part.startswith(skipped) for part in path.relative_to(repo).parts))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(checkout: Path, staging: Path, repo: Path) -> dict:
    """Everything the kit carries, into `staging` (a new folder); returns the manifest written there."""
    staging.mkdir()
    comfyui_bytes = copy_comfyui(checkout, staging / "comfyui")
    download_wheels(checkout, staging / "wheels")
    wheels = []
    for wheel in sorted((staging / "wheels").glob("*.whl")):
        name, version, *_ = image.wheel_tags(wheel.name)
        carried = next((c for c in image.CARRIED if image.canonical(c.name) == image.canonical(name)), None)
        left_out = leave_out(wheel, carried.leave_out) if carried else []
        wheels.append({"file": wheel.name, "name": name, "version": version, "bytes": wheel.stat().st_size, "sha256": sha256(wheel),
                       "why": carried.why if carried else "", "left_out": left_out})
    problems = check_wheels(staging / "wheels")
    if problems:
        raise PrepareError("the wheels would not serve the GPU image:\n  " + "\n  ".join(problems))
    working_tree = travelling_bytes(repo)
    manifest = {
        "comfyui": {"version": comfyui_version(checkout), "bytes": comfyui_bytes},
        "wheels": wheels,
        "not_carried": image.NOT_CARRIED,
        "python": image.PYTHON_VERSION, "platforms": list(image.PLATFORMS),
        "working_tree_bytes": working_tree,
        "limit_bytes": image.CARRY_LIMIT_BYTES,
    }
    manifest["kit_bytes"] = folder_bytes(staging)  # before the manifest itself, a few kilobytes
    manifest["carried_bytes"] = manifest["kit_bytes"] + working_tree
    if manifest["carried_bytes"] >= image.CARRY_LIMIT_BYTES:
        raise PrepareError(f"the kit ({manifest['kit_bytes'] / MIB:.1f} MiB) and the working tree ({working_tree / MIB:.1f} MiB) "
                           f"come to {manifest['carried_bytes'] / MIB:.1f} MiB, over the {image.CARRY_LIMIT_BYTES // MIB} MiB that "
                           "travel: leave large untracked files out of the working tree, or carry less")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def install(staging: Path, target: Path) -> None:
    """Puts the staged kit in place of the previous one in two renames on one file system."""
    previous = target.with_name(target.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def summary(manifest: dict, target: Path) -> str:
    wheels = sum(w["bytes"] for w in manifest["wheels"])
    lines = [f"GPU kit prepared in {target}: ComfyUI {manifest['comfyui']['version']} "
             f"({manifest['comfyui']['bytes'] / MIB:.1f} MiB), {len(manifest['wheels'])} wheels ({wheels / MIB:.1f} MiB):"]
    lines += [f"  {w['file']}" + (f" (without {', '.join(w['left_out'])})" if w["left_out"] else "") for w in manifest["wheels"]]
    lines.append(f"Carried with the working tree ({manifest['working_tree_bytes'] / MIB:.1f} MiB): "
                 f"{manifest['carried_bytes'] / MIB:.1f} MiB of {manifest['limit_bytes'] // MIB} MiB.")
    lines.append(f"On the GPU machine, with {target.name} carried: dev/gpu_kit/run.sh --out DIR")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dev.gpu_kit.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI checkout whose tree the kit carries")
    parser.add_argument("--into", type=Path, default=KIT_FOLDER, help="the kit's folder (default: .gpu-kit at the repository's root)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    checkout, target = args.comfyui.expanduser().resolve(), args.into.expanduser().resolve()
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent)) / "kit"
    try:
        check_checkout(checkout)
        manifest = build(checkout, staging, REPO_ROOT)
        install(staging, target)
    except PrepareError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prepare: interrupted; {target.name} is as it was. Run the same command again to prepare it.", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    print(summary(manifest, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
