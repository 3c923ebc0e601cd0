"""File stages: write an item's thumbnails into an output tree, atomically and safely.

Atomic: each file is written to a temporary file in its final directory, optionally fsynced,
then renamed over the final name with :func:`os.replace`, so a reader (or a crash) sees either
the old file or the new one, never half of one. Temporary files are named
``.<final name>.tmp-<32 hex digits>``; :func:`clean_stale_temp_files` removes those a killed run
left behind, and the :func:`write` stage calls it when a run opens the stage.

Stale, and not merely in progress: each open :func:`write` stage holds a shared ``flock`` on its
root directory for the whole run. When a run opens the stage and can take that lock exclusively,
no other writer (in any process) is using the tree, so every temporary file in it is a crash's
leftover and goes. When it cannot, another run is writing there, and only temporary files older
than ``stale_after`` (an hour by default) go: an :func:`atomic_write` lives for one write, a few
milliseconds, or seconds on a slow network disk, so an hour-old temporary file is nobody's.

Safe: the directory of an item comes from its key through :func:`safe_key`, which never lets data
choose a path outside the output tree (no ``..``, no absolute paths, no separators, no NUL, no
reserved device names), and never maps two distinct keys to one name, even on case-insensitive
file systems. The directories under the root are made one at a time, each checked first: a
symlink that leads out of the root (planted, or left over) is refused before anything is
created through it, and every final path is checked again, once resolved, to lie inside the root.

Item fields: reads the key (``id``) and ``thumbnails`` (as :func:`stages.image.thumbnail`
makes them). Returns a new item whose thumbnails have ``data`` replaced by ``path`` (relative to
the root, with ``/`` separators) and with ``outputs``, the list of those paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pipeline import Context, ResourceError, factory

from ._options import FieldName, Flag, LowerCase, Seconds, checked_options

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the age rule alone applies
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EXTENSIONS",
    "OutputWriteError",
    "atomic_write",
    "clean_stale_temp_files",
    "safe_key",
    "write",
    "write_item",
]

log = logging.getLogger(__name__)

EXTENSIONS: dict[str, str] = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png", "GIF": "gif", "AVIF": "avif"}
"""File extension by Pillow format name."""

Layout = Annotated[Literal["nested", "sharded"], LowerCase]
"""``"nested"`` or ``"sharded"``, in any case."""

STALE_AFTER = 3600.0
"""Default age in seconds past which a temporary file counts as stale while another run writes."""

_TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
# A key used as is: lower-case ASCII letters, digits, '.', '_', '-'; no leading dot. Upper case is
# left out so that "ABC" and "abc" cannot share a directory on a case-insensitive file system.
_CLEAN = re.compile(r"^[a-z0-9_-][a-z0-9._-]{0,63}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_PREFIX_LEN = 40
_HASH_HEX = 32  # 128 bits: a collision between distinct keys is not a practical concern
# Names Windows reserves for devices, with or without an extension (SMB and WSL shares apply them too).
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{port}{n}" for port in ("com", "lpt") for n in "0123456789"}
)


class OutputWriteError(OSError):
    """Writing an output file failed (disk full, permission denied, a file where a directory
    should be, ...). The message names the path; the original ``OSError`` is its cause."""


def safe_key(key: object) -> str:
    """Return a file-name component for ``key`` that is safe on any file system.

    A key of up to 64 lower-case ASCII letters, digits, ``.``, ``_`` and ``-`` that does not
    start with a dot, end with a dot or name a reserved device is used as is. Any other key
    becomes a readable prefix (its safe characters, up to 40) plus ``~`` plus 32 hex digits of
    its SHA-256. As ``~`` never occurs in a key used as is, distinct keys never share a name.

    Args:
        key: The item's key; anything but ``str`` is turned into one with ``str()``, so the
            keys ``42`` and ``"42"`` share a name (a key column has one type).

    Examples:
        ``"sku-42"`` stays ``"sku-42"``; ``"../../etc/passwd"`` becomes
        ``"etc_passwd~<hash>"``; ``"SKU-42"`` becomes ``"SKU-42~<hash>"``.
    """
    text = key if isinstance(key, str) else str(key)
    if _CLEAN.match(text) and not text.endswith(".") and text.split(".", 1)[0] not in _RESERVED:
        return text
    # surrogatepass: a str key may hold lone surrogates, which strict UTF-8 refuses to encode.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    prefix = _UNSAFE_RUN.sub("_", text).strip("._")[:_PREFIX_LEN].rstrip(".")
    if not prefix or prefix.split(".", 1)[0].lower() in _RESERVED:
        prefix = f"_{prefix}"  # "con.txt~..." would still be the device CON to Windows
    return f"{prefix}~{digest}"


def _key_dir(key: object, layout: Layout) -> str:
    name = safe_key(key)
    if layout == "sharded":
        # Two hex digits of the name's hash spread items over 256 directories.
        return f"{hashlib.sha256(name.encode()).hexdigest()[:2]}/{name}"
    return name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data_or_callback: bytes | bytearray | memoryview | Callable[[IO[bytes]], object],
    *,
    fsync: bool = False,
) -> Path:
    """Write a file atomically: a temporary file in the same directory, then :func:`os.replace`.

    The temporary file is ``.<name>.tmp-<uuid hex>`` and is removed on every failure path,
    including an exception raised by the callback. The directory must exist.

    Args:
        path: The final path.
        data_or_callback: The bytes to write, or a callable that writes into the open binary file.
        fsync: Flush the file to disk before the rename and the directory after it, so the new
            content survives a power loss once this returns. Costs a disk round trip or two.

    Returns:
        The final path.

    Raises:
        OSError: From the file system, unchanged; the final path is untouched.
    """
    final = Path(path)
    temp = final.with_name(f".{final.name}{_TEMP_MARK}{uuid.uuid4().hex}")
    # O_EXCL: never follow or reuse something already at the temporary name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, 0o666)  # the umask decides, as for any file the user creates
    try:
        with open(fd, "wb") as f:
            if callable(data_or_callback):
                data_or_callback(f)
            else:
                f.write(data_or_callback)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if fsync:
        _fsync_dir(final.parent)
    return final


def clean_stale_temp_files(root: str | os.PathLike[str], *, older_than: float = 0.0) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left under ``root`` when a run was killed.

    Only names of the form ``.<name>.tmp-<32 hex digits>`` are touched. Call it before a run
    starts, or pass ``older_than`` when another run may be writing into the same tree.

    Args:
        root: The output root; a missing root removes nothing.
        older_than: Only remove files last modified more than this many seconds ago.

    Returns:
        The paths removed.
    """
    cutoff = time.time() - older_than
    removed = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if not _TEMP_NAME.match(name):
                continue
            candidate = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if older_than <= 0 or candidate.lstat().st_mtime < cutoff:
                    candidate.unlink()
                    removed.append(candidate)
    return removed


def _lock_and_clean(root: Path, stale_after: float) -> tuple[int | None, list[Path], bool]:
    """Create ``root``, take a shared lock on it, and remove the stale temporary files under it.

    Returns the locked directory's descriptor (``None`` where locks are unavailable), the
    removed paths, and whether this was the only writer (so every temporary file was stale).
    """
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None, clean_stale_temp_files(root, older_than=stale_after), False
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        alone = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            alone = False  # another run holds its shared lock: it is writing here now
        except OSError:
            # A file system without flock (some network mounts): fall back on age alone.
            os.close(fd)
            return None, clean_stale_temp_files(root, older_than=stale_after), False
        removed = clean_stale_temp_files(root, older_than=0.0 if alone else stale_after)
        # From exclusive to shared: later runs see a writer. (The conversion is not atomic, but
        # no temporary file of ours exists yet for a run slipping in between to remove.)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd, removed, alone


@factory
@checked_options  # the engine checks a run's options; this checks a direct call's, once
@contextlib.asynccontextmanager
async def write(
    ctx: Context,
    *,
    root: str,
    fsync: Flag = False,
    key_field: FieldName = "id",
    layout: Layout = "nested",
    stale_after: Seconds = STALE_AFTER,
) -> AsyncIterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """Stage: write every thumbnail of an item under ``root``, atomically (see :func:`write_item`).

    When the run opens the stage, the root is created if missing and the temporary files that
    killed runs left in it are removed (see the module docstring for why that is safe while
    another run writes into the same tree); the count is logged. The stage holds a shared lock
    on the root until the run ends.

    Args:
        ctx: The engine's context.
        root: The output root directory; created if missing.
        fsync: Make each file durable before moving on (see :func:`atomic_write`).
        key_field: The field holding the item's key.
        layout: ``"nested"`` or ``"sharded"``.
        stale_after: While another run writes into ``root``, only temporary files older than
            this many seconds are removed at start.

    Raises:
        ResourceError: The root cannot be created or opened (a file in the way, no permission).
        ConfigError: On a direct call, an option is invalid (also a ``ValueError``); in a run
            the engine refuses it when the stage is defined, before anything runs.
    """
    root_path = Path(root)
    try:
        fd, removed, alone = await asyncio.to_thread(_lock_and_clean, root_path, float(stale_after))
    except OSError as exc:
        error = _write_error(exc, root_path, "prepare the output root")
        raise ResourceError(f"stage {ctx.stage!r}: {error}") from exc
    log.info(
        "stage %r: removed %d stale temporary file%s under %s%s",
        ctx.stage,
        len(removed),
        "" if len(removed) == 1 else "s",
        root_path,
        "" if alone else f" (another run is writing there: only those older than {stale_after:g}s)",
    )
    try:
        yield functools.partial(write_item, root=root, fsync=fsync, key_field=key_field, layout=layout)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def write_item(
    item: dict[str, Any],
    *,
    root: str,
    fsync: bool = False,
    key_field: str = "id",
    layout: Layout = "nested",
) -> dict[str, Any]:
    """Write every thumbnail of the item to ``<root>/<key dir>/<name>.<ext>``, atomically.

    The per-item step of the :func:`write` stage, callable on its own outside a run.

    ``<key dir>`` is :func:`safe_key` of the item's key (``layout="nested"``), or that under a
    two-hex-digit shard directory (``layout="sharded"``, for trees of very many items).
    ``<name>`` is the thumbnail's name passed through :func:`safe_key` too, ``<ext>`` follows its
    format. Directories are created as needed; an existing file of the same name is replaced.

    Args:
        item: The item, with its key and ``thumbnails``.
        root: The output root directory; created if missing.
        fsync: Make each file durable before moving on (see :func:`atomic_write`).
        key_field: The field holding the item's key.
        layout: ``"nested"`` or ``"sharded"``.

    Returns:
        A new item: each thumbnail without ``data`` and with ``path``; ``outputs`` lists the paths.

    Raises:
        OutputWriteError: The file system refused a write; the message names the path.
        ValueError: The item lacks its key or thumbnails, or a path would leave the root.
    """
    if key_field not in item:
        raise ValueError(f"item has no key field {key_field!r}; set key_field to the field that names it")
    thumbnails = item.get("thumbnails")
    if not isinstance(thumbnails, list):
        raise ValueError(
            f"item {item[key_field]!r} has no 'thumbnails' list (found {type(thumbnails).__name__}); "
            "run the thumbnail stage before write"
        )
    root_path = Path(root)
    key_dir = _key_dir(item[key_field], layout)
    planned: list[tuple[str, bytes, dict[str, Any]]] = []
    for thumb in thumbnails:
        fmt = str(thumb.get("format", "")).upper()
        if fmt not in EXTENSIONS:
            raise ValueError(
                f"thumbnail {thumb.get('name')!r} of item {item[key_field]!r} has format {fmt!r}; "
                f"write knows {', '.join(EXTENSIONS)}"
            )
        data = thumb.get("data")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(
                f"thumbnail {thumb.get('name')!r} of item {item[key_field]!r} has no bytes in 'data'; "
                "was it written already?"
            )
        rel = f"{key_dir}/{safe_key(thumb.get('name', ''))}.{EXTENSIONS[fmt]}"
        if any(rel == other for other, _, _ in planned):
            raise ValueError(
                f"two thumbnails of item {item[key_field]!r} would both be written to {rel!r}; "
                "give each thumbnail a distinct name"
            )
        planned.append((rel, bytes(data), thumb))

    try:
        if not os.path.lexists(root_path):  # the operator's root; whatever stands there is checked below
            root_path.mkdir(parents=True, exist_ok=True)
        resolved_root = root_path.resolve()
        _make_dirs_inside(resolved_root, key_dir, item[key_field])
    except OSError as exc:
        raise _write_error(exc, root_path / key_dir, "create the directory") from exc
    outputs = []
    new_thumbs = []
    for rel, data, thumb in planned:
        final = resolved_root / rel
        # Belt and braces: safe_key already excludes escapes, but a symlink inside the tree
        # (planted or left over) could still point out of it.
        if not final.parent.resolve().is_relative_to(resolved_root):
            raise ValueError(
                f"output path {str(final)!r} for item {item[key_field]!r} resolves outside the output "
                f"root {str(resolved_root)!r} (a symlink in the tree?); remove it"
            )
        try:
            atomic_write(final, data, fsync=fsync)
        except OSError as exc:
            raise _write_error(exc, final, "write") from exc
        outputs.append(rel)
        new_thumbs.append({**{k: v for k, v in thumb.items() if k != "data"}, "path": rel})
    result = dict(item)
    result["thumbnails"] = new_thumbs
    result["outputs"] = outputs
    return result


def _make_dirs_inside(root: Path, rel: str, key: object) -> None:
    """Create ``root/rel`` one component at a time, checking each before anything is made in it.

    A component that is a symlink must resolve inside ``root``, else nothing is created
    through it; a symlink that stays inside is followed.

    Raises:
        ValueError: A component is a symlink leading out of ``root``.
        OSError: From the file system, unchanged.
    """
    current = root
    for part in rel.split("/"):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            # The parent was checked, and a new directory is a real one, not a link.
            with contextlib.suppress(FileExistsError):  # another writer made it just now
                os.mkdir(current)
            mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            target = current.resolve()
            if not target.is_relative_to(root):
                raise ValueError(
                    f"output directory {str(current)!r} for item {key!r} is a symlink to {str(target)!r}, "
                    f"outside the output root {str(root)!r}; nothing was written through it. Remove the "
                    "symlink (it resolves outside the output root)"
                )


def _dangling_link(path: Path) -> tuple[Path, str] | None:
    """The first of ``path`` and its parents that is a symlink to nothing, with its target."""
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            if candidate.is_symlink() and not candidate.exists():
                return candidate, os.readlink(candidate)
    return None


def _write_error(exc: OSError, path: Path, action: str) -> OutputWriteError:
    """Translate a file-system error into a sentence naming the path and a likely fix."""
    code = errno.errorcode.get(exc.errno or 0, "")
    hint = {
        "ENOSPC": "free some space on that file system",
        "EDQUOT": "raise the disk quota or free some space",
        "EACCES": "give the pipeline's user write permission there",
        "EPERM": "give the pipeline's user write permission there",
        "EROFS": "choose a root on a writable file system",
        "ENOTDIR": "a file stands where a directory is needed; move it or choose another root",
        "EEXIST": "a file stands where a directory is needed; move it or choose another root",
        "EISDIR": "a directory stands where the file should go; remove it",
    }.get(code, "check the output root")
    if code in ("ENOENT", "ENOTDIR", "EEXIST"):
        dangling = _dangling_link(path)
        if dangling is not None:
            link, target = dangling
            hint = (
                f"{str(link)!r} is a dangling symlink to {target!r}; create {target!r} (a directory), "
                "point the link at an existing directory, or choose another root"
            )
    reason = exc.strerror or str(exc)
    return OutputWriteError(f"could not {action} {str(path)!r}: {reason} ({code or exc.errno}); {hint}")
