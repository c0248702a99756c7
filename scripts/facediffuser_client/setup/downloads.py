"""The set-up's downloads: from the Hugging Face hub (or any address, for an insightface zip) into a hidden partial
file beside the target, resumed, verified against the size and hash the hub publishes, and only then given the
target's name; and a file already in place compared with the hub's hash. huggingface_hub (ComfyUI's requirements)
is imported only when a download needs it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import urllib.parse
from pathlib import Path

from ..verified_records import remember_verified
from .download_progress import DownloadProgress, ReportingFile
from .steps import SetupError

HUB_REPOSITORY = "CodeGoat24/Face-diffuser"
CHUNK_BYTES = 8 * 2**20
HASH_LENGTHS = {64: "sha256", 40: "git-sha1"}  # the hub's ETag: sha256 for LFS files, the git blob sha1 otherwise


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
