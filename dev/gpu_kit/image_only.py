"""The GPU image's packages, and nothing else, importable in this process: a rehearsal on another machine then
fails where the GPU machine would, on a package the image lacks and the kit does not carry."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import sys

from dev.gpu_kit import image


def _requirements(name: str) -> list[str]:
    try:
        requires = importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [image.requirement_name(line) for line in requires if image.applies_on_the_image(line.partition(";")[2])]


def available_on_the_image() -> set[str]:
    """The image's packages and the carried ones, with what their versions installed here require (a version
    here may need a package the image's version does not: that one is the image's own business)."""
    available = set(image.IMAGE_PACKAGES) | {image.canonical(carried.name) for carried in image.CARRIED}
    pending = list(available)
    while pending:
        for needed in _requirements(pending.pop()):
            if needed not in available:
                available.add(needed)
                pending.append(needed)
    return available


class _WithoutMissing:
    """Python's path finder, blind to the top-level modules of the distributions the image lacks: importing one
    fails, and probing for one (importlib.util.find_spec) finds nothing, as on the image."""

    def __init__(self, finder, missing: set[str]):
        self.finder, self.missing = finder, missing

    def find_spec(self, name: str, path=None, target=None):
        if path is None and name in self.missing:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute: str):
        return getattr(self.finder, attribute)


def refuse_what_the_image_lacks() -> None:
    available = available_on_the_image()
    missing = {module for module, distributions in importlib.metadata.packages_distributions().items()
               if all(image.canonical(distribution) not in available for distribution in distributions)}
    sys.meta_path[:] = [_WithoutMissing(finder, missing) if finder is importlib.machinery.PathFinder else finder
                        for finder in sys.meta_path]
