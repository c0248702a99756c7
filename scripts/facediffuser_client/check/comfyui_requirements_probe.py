"""Run by the first-run check as a script, with the Python that runs ComfyUI, in a process of its own: imports the
packages of ComfyUI's requirements.txt that ComfyUI needs to start (those above its "#non essential dependencies"
line), as ComfyUI imports them, and prints one JSON object: {"requirements": {name: "" or why it does not import},
"torch": torch's version or null}; "" when it imports, "not installed", or the error. In a process of its own because a broken build can leave the importing process
unusable: a torchvision that does not match torch fails in its C++ operators ("operator torchvision::nms does not
exist"), which ComfyUI then fails on at start. Standard library only; it imports nothing of the pack.

    python comfyui_requirements_probe.py <ComfyUI>/requirements.txt
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import sys

OPTIONAL_FROM = "#non essential"  # ComfyUI's requirements.txt lists what it can start without after this line


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def essential_requirements(path: str) -> list[str]:
    names = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line.lower().startswith(OPTIONAL_FROM):
                break
            if line and not line.startswith(("#", "-")):
                names.append(re.split(r"[\s<>=~!;\[@]", line, maxsplit=1)[0])
    return names


def modules_of(name: str, installed: dict[str, list[str]]) -> list[str]:
    """The module a distribution is imported as: the one named like it (torch, comfy_kitchen), else its public
    top-level modules (Pillow: PIL, pyyaml: yaml); for one not installed, its name as a module, to say why it fails."""
    modules = installed.get(normalized(name), [])
    same = [module for module in modules if normalized(module) == normalized(name)]
    return same or sorted(module for module in modules if not module.startswith("_")) or [normalized(name).replace("-", "_")]


NOT_INSTALLED = "not installed"


def why_not(name: str, module: str) -> str:
    """"" when `module` imports; else NOT_INSTALLED, or the error of the installed package."""
    try:
        importlib.import_module(module)
    except BaseException as error:  # a broken build raises anything, and an extension module may call exit()
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return NOT_INSTALLED
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".rstrip(": ")
    return ""


def main(requirements_txt: str) -> None:
    installed: dict[str, list[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            installed.setdefault(normalized(distribution), []).append(module)
    results = {}
    for name in essential_requirements(requirements_txt):
        results[name] = next(filter(None, (why_not(name, module) for module in modules_of(name, installed))), "")
    torch = sys.modules.get("torch")
    print(json.dumps({"requirements": results, "torch": getattr(torch, "__version__", None)}))


if __name__ == "__main__":
    main(sys.argv[1])
