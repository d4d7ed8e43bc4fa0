"""Where checkpoints come from and go to: local folders, hub names, and atomically written outputs.

Input: a local folder wins; a name shaped like `org/name` that is no local path is a hub
repo, looked up with one short, unretried request (huggingface_hub retries its listing calls
for ~25 s when there is no network), falling back to the local Hugging Face cache.

Output (`atomic_output`): a converted checkpoint is written into a temporary sibling folder
and renamed into place only when complete, so a killed `llava convert` never leaves a
half-written folder under the destination's name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from llava.checkpoint.io import honour_umask
from llava.errors import CheckpointNotFound, OutputPathError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The one metadata request's timeout (connect and read, each), unless HF_HUB_ETAG_TIMEOUT says otherwise.
HUB_PROBE_TIMEOUT_S = 3.0
_IGNORED_HUB_FILES = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf"]


# Input ------------------------------------------------------------------------------------------
def model_name(folder: str) -> str:
    """The original's model name: the folder's name, or `<parent>_<checkpoint-N>` for trainer checkpoints."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def looks_like_hub_id(name: str) -> bool:
    """`org/name` with hub-legal characters, and not a path into a local folder that exists
    (`models/llava` beside a `models/` folder is a mistyped local path, not a repo)."""
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
        return False
    return not os.path.isdir(name.split("/")[0])


def resolve_path(path: str | os.PathLike) -> tuple[str, str]:
    """(local folder, model name). Hub names are looked up only when no such local folder exists."""
    local = os.path.expanduser(os.fspath(path))
    if os.path.isdir(local):
        return local, model_name(local)
    if os.path.exists(local):
        raise CheckpointNotFound(f"{local} is a file, not a checkpoint folder; pass the folder that holds it")
    if looks_like_hub_id(local):
        return hub_snapshot(local), local.split("/")[-1]
    parent = os.path.dirname(os.path.abspath(local))
    hint = "" if os.path.isdir(parent) else " (nor its parent folder)"
    raise CheckpointNotFound(f"checkpoint folder not found: {local}{hint}")


def _probe_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT_S)
    except ValueError:
        return HUB_PROBE_TIMEOUT_S


def _hub_files(repo_id: str) -> list[str]:
    """The repo's file names from one metadata request (no retries), or an exception saying why not."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, timeout=_probe_timeout())
    return [s.rfilename for s in info.siblings or []]


def hub_snapshot(repo_id: str, filename: str | None = None) -> str:
    """A hub repo's snapshot folder (or, with `filename`, that one file's local path): downloaded
    when the hub answers, else the cached copy. Other frameworks' weights, and .bin copies of
    safetensors weights, are not downloaded."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    what = repo_id if filename is None else f"{repo_id}/{filename}"
    if constants.HF_HUB_OFFLINE:
        reason = "offline: HF_HUB_OFFLINE is set"
    else:
        try:
            files = _hub_files(repo_id)
        except GatedRepoError:
            raise CheckpointNotFound(f"{repo_id!r} is a gated repo on the Hugging Face hub: accept its terms on its "
                                     "page and log in (hf auth login), or download it and pass the local folder") \
                from None
        except RepositoryNotFoundError:
            files, reason = None, "no such repo on the hub, or it is private"
        except Exception as err:  # no network, DNS, proxy, timeout, hub down: all mean "use the cache"
            files, reason = None, f"could not reach the hub: {type(err).__name__}: {' '.join(str(err).split())[:160]}"
        if files is not None and filename is not None:
            if filename not in files:
                raise CheckpointNotFound(f"the hub repo {repo_id!r} has no {filename}")
            return hf_hub_download(repo_id, filename, etag_timeout=_probe_timeout())
        if files is not None:
            ignore = list(_IGNORED_HUB_FILES)
            if any(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f) for f in files):
                ignore.append("pytorch_model*.bin")
            return snapshot_download(repo_id=repo_id, ignore_patterns=ignore, etag_timeout=_probe_timeout())
    try:
        if filename is not None:
            return hf_hub_download(repo_id, filename, local_files_only=True)
        return snapshot_download(repo_id=repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and kin: not cached
        raise CheckpointNotFound(
            f"{what!r} is not a local folder, and not in the Hugging Face cache ({reason}), so it could not be "
            "fetched from the Hugging Face hub; download it and pass the local folder") from None


# Output -----------------------------------------------------------------------------------------
def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _is_checkpoint_folder(folder: str) -> bool:
    """What --overwrite may replace: a flat folder with a config (not, say, a home folder given by mistake)."""
    entries = os.listdir(folder)
    has_config = any(f in entries for f in ("config.json", "adapter_config.json"))
    return has_config and not any(os.path.isdir(os.path.join(folder, f)) for f in entries)


def existing_ancestor(path: str) -> str:
    """`path` itself or its nearest ancestor that exists: where a new folder at `path` would be made."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output(src_folder: str, dst: str | os.PathLike, overwrite: bool = False) -> str:
    """The absolute DST to write, or OutputPathError when it must not be written.

    Refused: DST equal to, inside or containing SRC (even with overwrite: the source would be
    replaced by, or hold, its own conversion); a non-empty DST without overwrite; a DST that is
    a file, sits under a file, or (with overwrite) is not a checkpoint folder.
    """
    dst_abs = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    src_real, dst_real = os.path.realpath(src_folder), os.path.realpath(dst_abs)
    if _inside(dst_real, src_real) or _inside(src_real, dst_real):
        relation = "is" if src_real == dst_real else "is inside" if _inside(dst_real, src_real) else "contains"
        raise OutputPathError(f"{dst} {relation} the source folder {src_folder}; write the converted checkpoint to "
                              "another folder")
    ancestor = existing_ancestor(os.path.dirname(dst_abs))
    if not os.path.isdir(ancestor):
        raise OutputPathError(f"cannot create {dst}: {ancestor} is a file, not a folder")
    if os.path.lexists(dst_abs):
        if not os.path.isdir(dst_abs):
            raise OutputPathError(f"{dst} exists and is a file, not a folder")
        if os.listdir(dst_abs) and not overwrite:
            raise OutputPathError(f"{dst} exists and is not empty; pass --overwrite (Python: overwrite=True) "
                                  "to replace it")
        if os.listdir(dst_abs) and not _is_checkpoint_folder(dst_abs):
            raise OutputPathError(f"{dst} is not a checkpoint folder (no config.json, or it holds subfolders); "
                                  "--overwrite replaces only checkpoint folders: remove it yourself or pick another")
    return dst_abs


@contextmanager
def atomic_output(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder of `dst`; on success it replaces `dst` (any old folder is
    removed only once the new one is in place), on failure it is removed. A SIGKILL leaves at
    most the `DST.tmp-*` folder, never a partial DST."""
    parent, base = os.path.split(os.path.abspath(dst))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{base}.tmp-", dir=parent)
    except OSError as err:
        raise OutputPathError(f"cannot create {dst}: {err.strerror or err}") from None
    try:
        honour_umask(tmp, directory=True)
        yield tmp
        _swap_in(tmp, dst, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def _swap_in(new: str, dst: str, overwrite: bool) -> None:
    """Rename `new` to `dst`; an existing `dst` is renamed aside first and deleted last."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if not overwrite and os.listdir(dst):  # filled while we were writing
        raise OutputPathError(f"{dst} exists and is not empty; pass --overwrite (Python: overwrite=True) to replace it")
    old = tempfile.mkdtemp(prefix=f"{os.path.basename(dst)}.old-", dir=os.path.dirname(os.path.abspath(dst)))
    os.rmdir(old)  # a free name beside dst
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except OSError:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
