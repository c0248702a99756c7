"""The set-up's steps for an insightface pack: in place with its face detector and the Identity Score's recognition
model, or installed (or completed) from its zip, unpacked flat whatever the layout inside it."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from ..check.findings import OK, PROBLEM
from ..check.model_files import auto_pack, check_insightface_pack, check_recognition_model
from ..pack import core
from .downloads import CHUNK_BYTES, fetch, partial_path
from .steps import SetupError, Step

packs, model_folders = core("insightface_packs"), core("model_folders")

SOURCE_VARIABLE = "FACEDIFFUSER_INSIGHTFACE_SOURCE"  # --insightface-source set once, as HF_ENDPOINT names a hub mirror


def archive_members(archive: Path, pack: str) -> dict[str, zipfile.ZipInfo]:
    """The pack's .onnx files in the zip by file name, wherever they lie in it; a damaged zip, or one that is
    not the pack, is an error."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            damaged = zipped.testzip()
            members = [m for m in zipped.infolist() if not m.is_dir() and m.filename.lower().endswith(".onnx")
                       and "__MACOSX" not in PurePosixPath(m.filename).parts]
    except (zipfile.BadZipFile, OSError) as error:
        raise SetupError(f"{archive} is not a readable zip file ({error}): incomplete or not the {pack} pack") from None
    if damaged is not None:
        raise SetupError(f"{archive} is damaged: {damaged} fails its checksum; download it again")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for member in members:
        name = PurePosixPath(member.filename).name
        if name in by_name:
            raise SetupError(f"{archive} holds two files named {name} ({by_name[name].filename}, {member.filename}): "
                             f"it is not a single insightface pack")
        by_name[name] = member
    if packs.detector_file(pack) not in by_name:
        found = ", ".join(sorted(by_name)) or "no .onnx file"
        raise SetupError(f"{archive} has no {packs.detector_file(pack)}, the {pack} pack's face detector (it holds {found}): "
                         f"is it the {pack} pack?")
    return by_name


def install_pack(archive: Path, pack: str, pack_dir: Path) -> None:
    """Unpack the zip's .onnx files flat into `pack_dir`: into a hidden folder first, then renamed into place,
    the detector last, so that a pack whose detector is present is complete."""
    members = archive_members(archive, pack)
    staging = pack_dir.with_name(f".{pack_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name, member in members.items():
                with zipped.open(member) as source, open(staging / name, "wb") as target:
                    shutil.copyfileobj(source, target, CHUNK_BYTES)
        if not pack_dir.exists():
            os.replace(staging, pack_dir)
        else:
            for name in sorted(members, key=lambda n: n == packs.detector_file(pack)):
                os.replace(staging / name, pack_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"  installed {pack}: {', '.join(sorted(members))} in {pack_dir}")


def install_pack_from(source: str, pack: str, pack_dir: Path) -> None:
    manual = (f"download {source} and unzip its .onnx files directly into {pack_dir}, or give the zip you have to the set-up: "
              f"--insightface-source <path of the zip>")
    if "://" not in source:
        install_pack(Path(source).expanduser(), pack, pack_dir)
        return
    download = partial_path(pack_dir.parent / f"{pack}.zip", "download")
    try:
        archive_members(download, pack)  # a complete zip from an interrupted earlier run needs no download
    except SetupError:
        try:
            fetch(source, download, None, None, f"{pack}.zip")
        except SetupError as error:
            raise SetupError(f"{error}. To do it by hand: {manual}") from None
    try:
        install_pack(download, pack, pack_dir)
    except SetupError:
        download.unlink(missing_ok=True)  # a wrong or damaged zip is not worth resuming
        raise
    download.unlink()


def insightface_steps(folders: model_folders.ModelFolders, pack: str | None, source: str | None) -> list[Step]:
    """A pack in place, with its face detector and the Identity Score's recognition model; or the steps that install
    it, or complete one that lacks its recognition model (from the same zip)."""
    roots = folders.search("insightface")
    pack_dir = None
    if pack is None:  # any pack the loader's `auto` takes will do
        finding = check_insightface_pack(roots)
        if finding.status == PROBLEM:
            raise SetupError(f"insightface: {finding.detail}: {finding.fix}")
        if finding.status == OK:
            recognition = check_recognition_model(roots)
            if recognition is None or recognition.status == OK:
                return [Step(f"insightface in place: {finding.detail}")]
            pack, pack_dir = auto_pack(roots)
        else:
            pack = packs.DEFAULT_PACK
    else:
        detected = [root / "models" / pack for root in roots if (root / "models" / pack / packs.detector_file(pack)).is_file()]
        complete = [folder for folder in detected if (folder / packs.recognition_file(pack)).is_file()]
        if complete:
            return [Step(f"insightface in place: {pack} in {complete[0]}")]
        pack_dir = detected[0] if detected else None
    source = source or packs.PACK_SOURCES.get(pack)
    if source is None:
        raise SetupError(f"insightface: {pack} has no official download (insightface's release has no {pack}.zip); "
                         f"give the zip you have, or its address, with --insightface-source, or use {packs.DEFAULT_PACK} (the default)")
    if pack_dir is None:
        pack_dir, what = folders.target("insightface") / "models" / pack, "install"
    else:
        what = f"complete (its {packs.recognition_file(pack)} is missing)"
    return [Step(f"{what} insightface {pack} from {source} into {pack_dir}", lambda: install_pack_from(source, pack, pack_dir),
                 packs.PACKS_LICENCE)]
