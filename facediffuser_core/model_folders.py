"""Where a ComfyUI installation keeps things, read without importing ComfyUI: the ComfyUI folder this pack is
installed in, and the folders ComfyUI searches for one kind of model, extra_model_paths.yaml included.

Standard library only, so that the first-run check, the set-up and the runner can use it on any Python;
PyYAML (one of ComfyUI's own requirements) is imported only when there is an extra_model_paths.yaml to read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
EXTRA_MODEL_PATHS = "extra_model_paths.yaml"


def find_comfyui(explicit: Path | None) -> Path | None:
    """`explicit`, else $COMFYUI_PATH, else the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>)."""
    candidates = [explicit] if explicit else [
        Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None,
        PACK_ROOT.parent.parent,
    ]
    for candidate in candidates:
        if candidate is not None and (candidate.expanduser() / "comfyui_version.py").is_file():
            return candidate.expanduser().resolve()
    return None


class ExtraModelPathsError(Exception):
    """An extra_model_paths.yaml that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class ExtraPath:
    folder_name: str
    path: Path
    is_default: bool
    config: Path


def read_extra_model_paths(config: Path) -> list[ExtraPath]:
    """The folders one extra_model_paths.yaml adds, resolved as ComfyUI's utils/extra_config.py resolves them:
    `base_path` (with ~ and $VARS expanded) relative to the file's folder, each line of a key's value relative
    to base_path, or to the file's folder when there is none."""
    try:
        import yaml
    except ImportError:
        raise ExtraModelPathsError(f"{config} cannot be read: PyYAML is not installed in this Python "
                                   f"(run this with the Python that runs ComfyUI)") from None
    try:
        with open(config, encoding="utf-8") as stream:
            sections = yaml.safe_load(stream) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ExtraModelPathsError(f"{config} cannot be read: {error}") from None
    if not isinstance(sections, dict):
        raise ExtraModelPathsError(f"{config} is not a mapping of sections (see ComfyUI's extra_model_paths.yaml.example)")
    config_dir = config.resolve().parent
    found = []
    for section in sections.values():
        if not isinstance(section, dict):
            continue
        section = dict(section)
        base_path = section.pop("base_path", None)
        if base_path is not None:
            base_path = Path(os.path.expandvars(os.path.expanduser(str(base_path))))
            if not base_path.is_absolute():
                base_path = config_dir / base_path
        is_default = bool(section.pop("is_default", False))
        for folder_name, value in section.items():
            for line in str(value).split("\n"):
                if not line:
                    continue
                path = (base_path / line) if base_path is not None else (config_dir / line)
                found.append(ExtraPath(folder_name, Path(os.path.normpath(path)), is_default, config))
    return found


@dataclass
class ModelFolders:
    """The model folders of one ComfyUI: its models directory and what extra_model_paths.yaml files add."""

    models_dir: Path
    extra: list[ExtraPath]

    @classmethod
    def of(cls, comfyui: Path | None, models_dir: Path | None, extra_configs=()) -> "ModelFolders":
        """As ComfyUI started from `comfyui` sees them: <comfyui>/extra_model_paths.yaml when it exists, then the
        files passed as --extra-model-paths-config. `models_dir` defaults to <comfyui>/models."""
        if models_dir is None:
            if comfyui is None:
                raise ValueError("the models folder is unknown: give the ComfyUI folder or the models folder")
            models_dir = comfyui / "models"
        configs = [comfyui / EXTRA_MODEL_PATHS] if comfyui is not None and (comfyui / EXTRA_MODEL_PATHS).is_file() else []
        configs += [Path(config) for config in extra_configs]
        return cls(Path(models_dir), [entry for config in configs for entry in read_extra_model_paths(config)])

    def target(self, folder_name: str) -> Path:
        """Where new files of this kind go: the first folder marked `is_default: true` for it in
        extra_model_paths.yaml (ComfyUI's "default dir for downloads"), else <models>/<folder_name>."""
        for entry in self.extra:
            if entry.folder_name == folder_name and entry.is_default:
                return entry.path
        return self.models_dir / folder_name

    def search(self, folder_name: str) -> list[Path]:
        """Every folder ComfyUI looks in for this kind, the target first."""
        folders = [self.target(folder_name), self.models_dir / folder_name]
        folders += [entry.path for entry in self.extra if entry.folder_name == folder_name]
        return list(dict.fromkeys(folders))
