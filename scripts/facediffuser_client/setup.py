"""The set-up's steps: Face-diffuser's weights from the Hugging Face hub and an insightface pack, each downloaded
beside its target, resumed, verified against the size and hash the hub publishes, and only then put in place; then
the first-run check's verdict. huggingface_hub (ComfyUI's requirements) is imported only when a step needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from . import check
from .pack import core
from .progress import PLAIN_LINES, StatusLine, time_left, timing_text

packs, model_folders = core("insightface_packs"), core("model_folders")

HUB_REPOSITORY = "CodeGoat24/Face-diffuser"
WEIGHTS_LICENCE = (
    f"The Face-diffuser weights ({HUB_REPOSITORY}) are licensed for non-commercial academic use only (under the "
    "2-clause BSD licence for that use); commercial use needs the authors' permission. "
    "See https://github.com/CodeGoat24/Face-diffuser#-license"
)
CHUNK_BYTES = 8 * 2**20
UNSIZED_LINE_BYTES = 10**8  # piped, a download of unknown size prints a line each 100 MB
SOURCE_VARIABLE = "FACEDIFFUSER_INSIGHTFACE_SOURCE"  # --insightface-source set once, as HF_ENDPOINT names a hub mirror
HASH_LENGTHS = {64: "sha256", 40: "git-sha1"}  # the hub's ETag: sha256 for LFS files, the git blob sha1 otherwise


@dataclass(frozen=True)
class HubModel:
    role: str
    repository_file: str
    names: tuple[str, ...]  # canonical names: the converted safetensors first, the download last
    source: str
    kinds: tuple[str, ...]


MODELS = (
    HubModel("SDM", "SDM/pytorch_model.bin", check.SDM_FILES, check.SDM_SOURCE, check.SDM_KINDS),
    HubModel("TDM", "TDM/pytorch_model.bin", check.TDM_FILES, check.TDM_SOURCE, check.TDM_KINDS),
)


class SetupError(Exception):
    """A step that cannot go on; the message says why and what to do, and the set-up moves on to the next step."""


@dataclass
class Step:
    summary: str  # what the step does, or why nothing needs doing
    run: Callable[[], None] | None = None  # None: already in place
    licence: str | None = None  # named before the step downloads anything


# --- downloads ---------------------------------------------------------------------------------------------


def hub():
    """huggingface_hub's public functions this script uses; imported late so --help works without it."""
    try:
        import huggingface_hub
        from huggingface_hub.file_download import http_get
    except ImportError:
        raise SetupError(f"huggingface_hub is not installed in this Python ({sys.executable}). Run the set-up with the "
                         f"Python that runs ComfyUI (it comes with ComfyUI's requirements), or install it: "
                         f"`{sys.executable} -m pip install huggingface_hub`") from None
    return huggingface_hub, http_get


def hub_url(repository_file: str) -> str:
    huggingface_hub, _ = hub()
    return huggingface_hub.hf_hub_url(HUB_REPOSITORY, repository_file, endpoint=os.environ.get("HF_ENDPOINT") or None)


def describe_network_error(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}{f' (HTTP {status})' if status else ''}{': ' + message if message else ''}"


def unreachable(what: str, error: BaseException, manual: str) -> SetupError:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
    return SetupError(
        f"cannot get {what}{offline}: {describe_network_error(error)}. Offline, or a firewall or proxy in the way? "
        f"Do it by hand: {manual}, then run the set-up again."
    )


def expected_hash(etag: str | None) -> tuple[str, str] | None:
    """(algorithm, hex digest) the hub's ETag promises for the file's content, if it is a content hash."""
    etag = (etag or "").strip('"').lower()
    algorithm = HASH_LENGTHS.get(len(etag)) if re.fullmatch(r"[0-9a-f]+", etag) else None
    return (algorithm, etag) if algorithm else None


def file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def partial_path(target: Path, tag: str) -> Path:
    """A hidden name beside the target (same file system, so the final rename is atomic) that ComfyUI does not list."""
    return target.with_name(f".{target.name}.{tag}.partial")


class _QuietRetries(logging.Filter):
    """huggingface_hub logs each of its retries ("Error while downloading ... Trying to resume"): offline, six of
    them for one file. The set-up's own message says what failed and what was kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Error while downloading from" not in record.getMessage()


@contextlib.contextmanager
def quiet_retries():
    logger = logging.getLogger("huggingface_hub.file_download")
    quiet = _QuietRetries()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class DownloadProgress:
    """A download's progress: what arrived of how much, the speed, the time elapsed and about how long the rest takes;
    one line redrawn in place on a terminal, a line each tenth of the file (each 100 MB of one of unknown size) where
    the output is piped or logged.
    The set-up's own, not huggingface_hub's bar, which a terminal that reports no width shows empty."""

    def __init__(self, label: str, total: int | None, start: int, stream=None, clock=time.monotonic):
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stdout
        self.line = StatusLine(self.stream)
        self.clock = clock
        self.began = clock()
        self.tenth_shown = -1
        self.unshown = ""  # piped: the last state, when it had no line of its own

    def show(self, have: int) -> None:
        elapsed = self.clock() - self.began
        arrived = have - self.start
        speed = f", {arrived / elapsed / 1e6:.1f} MB/s" if elapsed > 0 and arrived > 0 else ""
        if self.total:
            left = time_left(elapsed, arrived, self.total - have) if have < self.total else None
            text = (f"  {self.label}: {have / 1e6:.1f} of {self.total / 1e6:.1f} MB ({100 * have // self.total}%){speed}, "
                    f"{timing_text(elapsed, left)}")
            tenth = PLAIN_LINES * have // self.total
        else:
            text, tenth = f"  {self.label}: {have / 1e6:.1f} MB{speed}, {timing_text(elapsed, None)}", have // UNSIZED_LINE_BYTES
        self.unshown = ""
        if self.line.terminal:
            self.line.draw(text)
        elif tenth != self.tenth_shown:
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self.unshown = text
        self.tenth_shown = tenth

    def end(self) -> None:
        """The last state on its line: a download ends on what arrived, however it ends."""
        if self.unshown:
            self.stream.write(self.unshown + "\n")
            self.stream.flush()
            self.unshown = ""
        self.line.end()


class ReportingFile:
    """The partial file as http_get writes it, showing the progress after each chunk. The file's position, not a
    count of chunks, is what arrived: http_get truncates and starts over when a server ignores the Range asked for."""

    def __init__(self, file, progress: DownloadProgress):
        self.file, self.progress = file, progress

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        self.progress.show(self.file.tell())
        return written

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def fetch(url: str, partial: Path, expected_size: int | None, headers: dict | None, label: str) -> None:
    """Download `url` into `partial`, resuming from what is already there; huggingface_hub's http_get retries
    with a Range request when the connection drops. The progress is the set-up's own (DownloadProgress)."""
    huggingface_hub, http_get = hub()
    huggingface_hub.utils.disable_progress_bars()  # one progress line, not two
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:
        partial.unlink()
        have = 0
    if expected_size is not None and have == expected_size:
        return
    if expected_size is not None:
        free = shutil.disk_usage(partial.parent).free
        if free < expected_size - have:
            raise SetupError(f"{label}: {(expected_size - have) / 1e9:.2f} GB more are needed in {partial.parent} but only "
                             f"{free / 1e9:.2f} GB are free; make room and run the set-up again")
    if have:
        print(f"  resuming {label} at {have / 1e6:.1f} MB")
    progress = DownloadProgress(label, expected_size, have)
    with open(partial, "ab") as file, quiet_retries():
        try:
            http_get(url, ReportingFile(file, progress), resume_size=have, headers=headers, expected_size=expected_size,
                     displayed_filename=label)
        except BaseException as error:  # httpx or requests errors, depending on the huggingface_hub version; Ctrl-C
            progress.end()
            file.close()
            kept = partial.stat().st_size if partial.exists() else 0
            if kept == 0:
                partial.unlink(missing_ok=True)  # nothing to resume from
            if isinstance(error, KeyboardInterrupt):
                raise
            if expected_size is not None and kept > expected_size:
                partial.unlink()
                raise SetupError(f"{label}: the server sent more than the {expected_size} bytes announced; the partial "
                                 f"file was removed: run the set-up again") from None
            if kept == 0:
                raise SetupError(f"{label}: the download did not start ({describe_network_error(error)})") from None
            raise SetupError(f"{label}: the download stopped ({describe_network_error(error)}); {kept / 1e6:.1f} MB are kept "
                             f"in {partial} and the next run resumes from there") from None
    progress.end()


def download_hub_file(repository_file: str, target: Path) -> None:
    """One file of the hub repository to `target`, verified against the hub's size and content hash."""
    huggingface_hub, _ = hub()
    url = hub_url(repository_file)
    manual = f"download {url} in a browser and save it as {target}"
    try:
        metadata = huggingface_hub.get_hf_file_metadata(url)
    except Exception as error:  # offline, DNS, proxy, TLS, HTTP 403/5xx: all end the same way for the user
        raise unreachable(f"the Hugging Face hub for {repository_file}", error, manual) from None
    promised = expected_hash(metadata.etag)
    partial = partial_path(target, promised[1][:16] if promised else "download")
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        if stale != partial:  # an interrupted download of another version of the file
            stale.unlink()
    # Hub credentials go to the hub only, never to the storage host it redirects to.
    same_host = urllib.parse.urlsplit(metadata.location).netloc == urllib.parse.urlsplit(url).netloc
    headers = huggingface_hub.utils.build_hf_headers() if same_host else None
    fetch(metadata.location, partial, metadata.size, headers, target.name)
    size = partial.stat().st_size
    if metadata.size is not None and size != metadata.size:
        raise SetupError(f"{target.name}: {size} bytes arrived but the hub announces {metadata.size}; "
                         f"{partial} is kept and the next run resumes it")
    if promised is None:
        print(f"  {target.name}: the hub gives no content hash (ETag {metadata.etag!r}); size checked only")
    else:
        algorithm, digest = promised
        print(f"  verifying {target.name} ({algorithm})")
        actual = file_hash(partial, algorithm)
        if actual != digest:
            partial.unlink()
            raise SetupError(f"{target.name}: the downloaded file does not match the hub's {algorithm} ({digest}, got "
                             f"{actual}); it was removed, nothing was installed. Run the set-up again; if this "
                             f"repeats, something between you and the hub alters the download (a proxy?): {manual}")
    os.replace(partial, target)
    if promised is not None:
        remember_verified(target, promised[1])
    print(f"  saved {target}")


def remember_verified(path: Path, digest: str, damaged: bool = False) -> None:
    """What the comparison with the hub's hash found, for the next runs and the check (check.verification)."""
    records = check.verified_records(path.parent)
    records[path.name] = {"stamp": check.file_stamp(path), "hash": digest, **({"damaged": True} if damaged else {})}
    record = path.parent / check.VERIFIED_RECORD
    record.with_name(record.name + ".tmp").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    os.replace(record.with_name(record.name + ".tmp"), record)


def was_verified(path: Path) -> bool:
    """Whether the file is unchanged (size and mtime) since its content matched the hub's hash."""
    return check.verification(path) == check.VERIFIED


def verify_in_place(repository_file: str, path: Path) -> None:
    """Check a file already in place against the hub's hash; a damaged file is a SetupError with the fix."""
    huggingface_hub, _ = hub()
    try:
        metadata = huggingface_hub.get_hf_file_metadata(hub_url(repository_file))
    except Exception as error:
        print(f"  not verified: the hub does not answer ({describe_network_error(error)}); the next run with a connection does it")
        return
    promised = expected_hash(metadata.etag)
    if promised is None:
        print("  not verified: the hub gives no content hash")
        return
    if metadata.size is not None and metadata.size != path.stat().st_size:  # another checkpoint of the layout (FastComposer's)
        print(f"  not the hub's file ({path.stat().st_size} bytes, the hub's has {metadata.size}); kept as it is")
        return
    algorithm, digest = promised
    print(f"  verifying {path.name} ({algorithm})")
    actual = file_hash(path, algorithm)
    if actual != digest:
        remember_verified(path, digest, damaged=True)
        raise SetupError(f"{path} is damaged: it has the size of the hub's {repository_file} but not its content ({algorithm} "
                         f"{actual}, the hub's {digest}), so it would load wrong weights. Delete it and run the set-up "
                         f"again, which downloads it anew")
    remember_verified(path, digest)
    print(f"  {path.name} matches the hub's {algorithm}")


# --- insightface packs -------------------------------------------------------------------------------------


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


# --- the plan ----------------------------------------------------------------------------------------------


def model_steps(model: HubModel, folders: model_folders.ModelFolders, convert: bool, verify: bool = False) -> list[Step]:
    """The model's steps: in place, verified against the hub's hash once (or again: `verify`), converted; or downloaded."""
    search = folders.search("facediffuser")
    existing = check.find_checkpoint(search, model.names)
    if existing is not None:
        finding = check.check_checkpoint(search, model.role, model.names, model.source, model.kinds)
        if finding.status != check.OK and not check.changed_since_verified(existing):  # changed: verified below
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


def insightface_steps(folders: model_folders.ModelFolders, pack: str | None, source: str | None) -> list[Step]:
    """A pack in place, with its face detector and the Identity Score's recognition model; or the steps that install
    it, or complete one that lacks its recognition model (from the same zip)."""
    roots = folders.search("insightface")
    pack_dir = None
    if pack is None:  # any pack the loader's `auto` takes will do
        finding = check.check_insightface_pack(roots)
        if finding.status == check.PROBLEM:
            raise SetupError(f"insightface: {finding.detail}: {finding.fix}")
        if finding.status == check.OK:
            recognition = check.check_recognition_model(roots)
            if recognition is None or recognition.status == check.OK:
                return [Step(f"insightface in place: {finding.detail}")]
            pack, pack_dir = check.auto_pack(roots)
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


def plan(folders: model_folders.ModelFolders, convert: bool, insightface_pack: str | None,
         insightface_source: str | None, verify: bool = False) -> tuple[list[list[Step]], list[str]]:
    """The steps of each part (SDM, TDM, insightface pack), and the problems that keep a part from being set up."""
    parts, problems = [], []
    planners = [lambda model=model: model_steps(model, folders, convert, verify) for model in MODELS]
    planners.append(lambda: insightface_steps(folders, insightface_pack, insightface_source))
    for planner in planners:
        try:
            parts.append(planner())
        except SetupError as error:
            problems.append(str(error))
    return parts, problems


def partial_downloads(folders: model_folders.ModelFolders) -> list[Path]:
    """The partial downloads an interrupted set-up leaves to resume from: beside the models, and the pack's zip."""
    places = (folders.target("facediffuser"), folders.target("insightface") / "models")
    return sorted(path for place in places if place.is_dir() for path in place.glob(".*.partial") if path.is_file())


def interrupted_message(folders: model_folders.ModelFolders) -> str:
    kept = partial_downloads(folders)
    if kept:
        arrived = ", ".join(f"{path} ({path.stat().st_size / 1e6:.1f} MB)" for path in kept)
        return f"interrupted: what arrived is kept: {arrived}; run the set-up again to resume"
    return ("interrupted: no partial download is left to resume (none had arrived yet); what is in place stays; run the "
            "set-up again to go on")


def set_up(comfyui: Path | None, models_dir: Path | None, extra_model_paths: tuple[Path, ...] = (), *, convert: bool = False,
           insightface_pack: str | None = None, insightface_source: str | None = None, dry_run: bool = False,
           verify: bool = False, python_found: str = "") -> int:
    """Everything not yet in place, the first-run check's report after it; the exit status (0: all in place; 130:
    Ctrl-C). `comfyui`: the folder the user named, if any; `python_found`: how this Python was found to be ComfyUI's."""
    root = model_folders.find_comfyui(comfyui)
    if root is None and models_dir is None:
        where = f"{comfyui} has no comfyui_version.py" if comfyui else "this pack is not inside ComfyUI/custom_nodes and COMFYUI_PATH is not set"
        print(f"error: ComfyUI not found ({where}): pass --comfyui <ComfyUI folder> or --models-dir <models folder>", file=sys.stderr)
        return 1
    try:
        folders = model_folders.ModelFolders.of(root, models_dir, extra_model_paths)
    except model_folders.ExtraModelPathsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Face-diffuser set-up: models into {folders.target('facediffuser')}, insightface into {folders.target('insightface')}")
    try:
        problems = carry_out(folders, convert, insightface_pack, insightface_source, dry_run, verify)
        if dry_run:
            return 1 if problems else 0
        print()
        findings = check.run_checks(comfyui, models_dir, extra_model_paths, python_found, script="facediffuser_setup")
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(folders)}", file=sys.stderr)
        return 130
    print(check.render(findings))
    return 1 if problems or check.to_do(findings) else 0


def carry_out(folders: model_folders.ModelFolders, convert: bool, insightface_pack: str | None, insightface_source: str | None,
              dry_run: bool, verify: bool) -> list[str]:
    """Each part's steps, said and (but in a dry run) done; the problems met, said at the end."""
    parts, problems = plan(folders, convert, insightface_pack, insightface_source, verify)
    to_do = [step for part in parts for step in part if step.run]
    for licence in dict.fromkeys(step.licence for step in to_do if step.licence):
        print(f"Licence: {licence}")
    if dry_run and to_do:
        print("Dry run, nothing is changed:")
    for part in parts:
        for step in part:
            print(f"{'would ' if dry_run and step.run else ''}{step.summary}")
            if step.run is None or dry_run:
                continue
            try:
                step.run()
            except SetupError as error:
                problems.append(str(error))
                break  # the part's later steps need this one
    if dry_run and not to_do:
        print("Dry run: nothing to do, all of the above is in place.")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return problems
