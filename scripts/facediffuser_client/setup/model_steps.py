"""The set-up's steps for the SDM and TDM: in place and verified against the hub's hash once, or downloaded; then
converted to fp16 safetensors when asked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..check.findings import OK
from ..check.model_files import (SDM_FILES, SDM_KINDS, SDM_SOURCE, TDM_FILES, TDM_KINDS, TDM_SOURCE, check_checkpoint,
                                 find_checkpoint)
from ..pack import core
from ..verified_records import changed_since_verified, was_verified
from .downloads import HUB_REPOSITORY, download_hub_file, hub_url, verify_in_place
from .steps import SetupError, Step

model_folders = core("model_folders")

WEIGHTS_LICENCE = (
    f"The Face-diffuser weights ({HUB_REPOSITORY}) are licensed for non-commercial academic use only (under the "
    "2-clause BSD licence for that use); commercial use needs the authors' permission. "
    "See https://github.com/CodeGoat24/Face-diffuser#-license"
)


@dataclass(frozen=True)
class HubModel:
    role: str
    repository_file: str
    names: tuple[str, ...]  # canonical names: the converted safetensors first, the download last
    source: str
    kinds: tuple[str, ...]


MODELS = (
    HubModel("SDM", "SDM/pytorch_model.bin", SDM_FILES, SDM_SOURCE, SDM_KINDS),
    HubModel("TDM", "TDM/pytorch_model.bin", TDM_FILES, TDM_SOURCE, TDM_KINDS),
)


def model_steps(model: HubModel, folders: model_folders.ModelFolders, convert: bool, verify: bool = False) -> list[Step]:
    """The model's steps: in place, verified against the hub's hash once (or again: `verify`), converted; or downloaded."""
    search = folders.search("facediffuser")
    existing = find_checkpoint(search, model.names)
    if existing is not None:
        finding = check_checkpoint(search, model.role, model.names, model.source, model.kinds)
        if finding.status != OK and not changed_since_verified(existing):  # changed: verified below
            raise SetupError(f"{finding.detail}. The set-up does not overwrite files it did not make: move it away or "
                             f"delete it and run the set-up again ({finding.fix})")
        bin_file = existing
        steps = [Step(f"{model.role} in place: {finding.detail}")]
        download = existing.with_name(model.names[-1])  # the hub has the hash of the download, not of a conversion
        if download.is_file() and (verify or (download == existing and not was_verified(existing))):
            steps.append(Step(f"verify {download} against the hub's sha256 ({'--verify' if verify else 'once'})",
                              lambda: verify_in_place(model.repository_file, download)))
        elif verify:
            steps.append(Step(f"not verified: {existing} is a conversion, and the hub has the hash of {model.names[-1]} only"))
    else:
        bin_file = folders.target("facediffuser") / model.names[-1]
        url = hub_url(model.repository_file)
        steps = [Step(f"download {model.role} {url} to {bin_file}",
                      lambda: download_hub_file(model.repository_file, bin_file), WEIGHTS_LICENCE)]
    converted = bin_file.with_name(model.names[0])
    if convert and bin_file.suffix == ".bin" and not converted.exists():
        steps.append(Step(f"convert {model.role} {bin_file.name} to fp16 {converted}", lambda: convert_to_fp16(bin_file, converted)))
    return steps


def convert_to_fp16(source: Path, target: Path) -> None:
    converter = core("convert")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # the converter reports its progress at INFO
    try:
        converter.convert(source, target, converter.DTYPES["fp16"])
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        raise SetupError(f"converting {source}: {error}") from None
    finally:
        root.setLevel(level)
    print(f"  converted: {target} (the loaders and the shipped workflows use it; {source.name} may be deleted)")
