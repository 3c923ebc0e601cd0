"""Tests for stages.files: atomic writes, safe names, failures, on a real file system (tmp_path)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

import pytest
from PIL import Image

from pipeline import ConfigError, ResourceError, Retry, Stage
from pipeline.testing import run_stages_async
from stages.files import (
    OutputWriteError,
    atomic_write,
    clean_stale_temp_files,
    safe_key,
    write,
    write_item,
)
from stages.image import thumbnail
from tests import images

HOSTILE_KEYS: list[object] = [
    "../../etc/passwd",
    "/abs",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "..",
    ".",
    "",
    "con",
    "CON",
    "con.txt",
    "nul",
    "lpt1",
    "x" * 5000,
    "x" * 5001,
    "café",
    "cafe\u0301",  # the same word, decomposed: distinct key, and HFS+ would normalise it
    "\u202eevil",
    "a\x00b",
    "a\x00c",
    "a\nb",
    ".hidden",
    "trailing.",
    "ABC",
    "abc",
    "abc~0123",
    "\ud800",  # a lone surrogate
    42,
    "a b",
    "a_b",
]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def thumb(name: str = "256", fmt: str = "WEBP", data: bytes = b"image bytes") -> dict[str, Any]:
    return {"name": name, "size": 256, "format": fmt, "width": 1, "height": 1, "data": data}


def test_atomic_write_writes_bytes(tmp_path: Path) -> None:
    """atomic_write puts the bytes at the final path and leaves nothing else behind."""
    target = tmp_path / "out.bin"
    assert atomic_write(target, b"hello", fsync=True) == target
    assert target.read_bytes() == b"hello"
    assert files_under(tmp_path) == [target]


def test_atomic_write_replaces_an_existing_file(tmp_path: Path) -> None:
    """An existing file is replaced whole."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content, longer than the new")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_atomic_write_accepts_a_callback(tmp_path: Path) -> None:
    """A callback writes into the open temporary file."""
    target = tmp_path / "out.png"
    atomic_write(target, lambda f: Image.new("RGB", (4, 3)).save(f, format="PNG"))
    with Image.open(target) as img:
        assert img.size == (4, 3)


def test_failing_callback_leaves_no_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    """A callback that raises half-way leaves no temporary file and the old content in place."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(f: IO[bytes]) -> None:
        f.write(b"partial")
        raise RuntimeError("encoder broke")

    with pytest.raises(RuntimeError, match="encoder broke"):
        atomic_write(target, half_then_fail)
    assert files_under(tmp_path) == [target]
    assert target.read_bytes() == b"old"


def test_failing_rename_leaves_no_temp(tmp_path: Path) -> None:
    """When the final rename fails (a non-empty directory stands at the path; this fails even
    for root), the written temporary file is removed."""
    target = tmp_path / "out.bin"
    target.mkdir()
    (target / "keep").write_bytes(b"")
    with pytest.raises(OSError, match="directory"):
        atomic_write(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_clean_stale_temp_files_removes_only_temp_files(tmp_path: Path) -> None:
    """clean_stale_temp_files removes atomic_write's temporary names, nested too, and nothing else."""
    (tmp_path / "k").mkdir()
    stale = tmp_path / "k" / ".256.webp.tmp-0123456789abcdef0123456789abcdef"
    stale.write_bytes(b"")
    kept = [tmp_path / "k" / "256.webp", tmp_path / ".tmp-notours", tmp_path / ".x.tmp-0123"]
    for path in kept:
        path.write_bytes(b"")
    assert clean_stale_temp_files(tmp_path) == [stale]
    assert files_under(tmp_path) == sorted(kept)


def test_clean_stale_temp_files_spares_recent_ones(tmp_path: Path) -> None:
    """With older_than, a temporary file modified just now is kept."""
    fresh = tmp_path / ".a.tmp-0123456789abcdef0123456789abcdef"
    fresh.write_bytes(b"")
    assert clean_stale_temp_files(tmp_path, older_than=3600) == []
    assert fresh.exists()


def test_clean_key_is_used_as_is() -> None:
    """A plain lower-case key is its own directory name."""
    assert safe_key("sku-42_b.v2") == "sku-42_b.v2"
    assert safe_key(42) == "42"


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_hostile_key_gives_one_safe_component(key: object) -> None:
    """Every hostile key maps to a single ASCII file-name component that is no special name."""
    name = safe_key(key)
    assert 0 < len(name) <= 80
    assert name.isascii()
    assert name.isprintable()
    assert "/" not in name
    assert "\\" not in name
    assert not name.startswith(".")
    assert not name.endswith(".")
    assert name.split(".")[0].lower() not in {"con", "nul", "prn", "aux", "lpt1"}


def test_distinct_keys_never_share_a_name() -> None:
    """Distinct keys give distinct names, also when compared case-insensitively."""
    keys = {str(k) for k in HOSTILE_KEYS} | {f"k{i}" for i in range(1000)} | {f"K{i}" for i in range(1000)}
    names = {safe_key(k).lower() for k in keys}
    assert len(names) == len(keys)


def test_odd_key_keeps_a_readable_prefix() -> None:
    """A key that needs hashing keeps its safe characters up front."""
    assert safe_key("../../etc/passwd").startswith("etc_passwd~")
    assert safe_key("SKU 42").startswith("SKU_42~")


@pytest.mark.parametrize("layout", ["nested", "sharded"])
@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_write_keeps_hostile_keys_inside_the_root(tmp_path: Path, key: object, layout: str) -> None:
    """Whatever the key, every file lands inside the root, at the path the item reports."""
    root = tmp_path / "out"
    result = write_item({"id": key, "thumbnails": [thumb()]}, root=str(root), layout=layout)  # type: ignore[arg-type]
    [rel] = result["outputs"]
    written = (root / rel).resolve()
    assert written.is_relative_to(root.resolve())
    assert written.read_bytes() == b"image bytes"
    assert files_under(tmp_path) == [written]


def test_write_reports_paths_and_drops_data(tmp_path: Path) -> None:
    """write drops each thumbnail's data, adds its relative path, and lists the paths in outputs."""
    item: dict[str, Any] = {
        "id": "sku-1",
        "thumbnails": [thumb("1024", "JPEG", b"big"), thumb("256", "JPEG", b"small")],
    }
    result = write_item(item, root=str(tmp_path))
    assert result["outputs"] == ["sku-1/1024.jpg", "sku-1/256.jpg"]
    assert [t["path"] for t in result["thumbnails"]] == result["outputs"]
    assert all("data" not in t for t in result["thumbnails"])
    assert (tmp_path / "sku-1" / "1024.jpg").read_bytes() == b"big"
    assert item["thumbnails"][0]["data"] == b"big"  # the input item is untouched, for a retry


def test_write_sharded_layout_adds_a_shard_directory(tmp_path: Path) -> None:
    """The sharded layout puts the key directory under a two-hex-digit shard."""
    result = write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(tmp_path), layout="sharded")
    shard, key_dir, name = result["outputs"][0].split("/")
    assert (len(shard), key_dir, name) == (2, "sku-1", "256.webp")
    int(shard, 16)


def test_write_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    """A symlink planted in the tree cannot redirect a write outside the root."""
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "sku-1").symlink_to(outside)
    with pytest.raises(ValueError, match="resolves outside the output root"):
        write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(root))
    assert list(outside.iterdir()) == []


def _tree(path: Path) -> list[str]:
    """Everything under ``path`` (not following symlinks), relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_write_creates_nothing_outside_the_root_through_a_planted_shard_symlink(tmp_path: Path) -> None:
    """A shard directory planted as a symlink out of the root is refused before any directory
    is created: the key directory is not made at the symlink's target, nor any file."""
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    shard = hashlib.sha256(b"sku-1").hexdigest()[:2]
    (root / shard).symlink_to(outside)
    with pytest.raises(ValueError, match=f"{shard}' for item 'sku-1' is a symlink to .*elsewhere', outside"):
        write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(root), layout="sharded")
    assert _tree(outside) == []
    assert _tree(root) == [shard]


def test_write_follows_a_symlink_that_stays_inside_the_root(tmp_path: Path) -> None:
    """A symlink inside the tree to another directory of the tree is no escape: writes go through it."""
    root = tmp_path / "out"
    (root / "real").mkdir(parents=True)
    (root / "sku-1").symlink_to(root / "real")
    result = write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(root))
    assert result["outputs"] == ["sku-1/256.webp"]
    assert (root / "real" / "256.webp").read_bytes() == b"image bytes"


def test_write_names_a_dangling_symlink_root(tmp_path: Path) -> None:
    """A root that is a symlink to nothing fails saying so, naming the link's target."""
    root = tmp_path / "out"
    root.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputWriteError, match=r"out' is a dangling symlink to '.*gone'") as info:
        write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(root))
    assert "a file stands where" not in str(info.value)
    assert _tree(tmp_path) == ["out"]


async def test_write_stage_names_a_dangling_symlink_root(tmp_path: Path) -> None:
    """Opened by a run, a dangling-symlink root fails the run at start, saying what it is."""
    root = tmp_path / "out"
    root.symlink_to(tmp_path / "gone")
    with pytest.raises(ResourceError, match=r"out' is a dangling symlink to '.*gone'; create"):
        await _one_item_through_write(root)
    assert _tree(tmp_path) == ["out"]


def test_write_stage_takes_layout_in_any_case() -> None:
    """layout = "Sharded" means "sharded": the stage's options are normalised when it is defined."""
    assert Stage(write, options={"root": "x", "layout": "Sharded"}).options["layout"] == "sharded"


def test_write_fails_clearly_when_root_is_a_file(tmp_path: Path) -> None:
    """A root that is a regular file (fails even for root) fails naming the path, and writes nothing."""
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    with pytest.raises(OutputWriteError, match=r"could not create the directory .*not-a-dir/sku-1.*ENOTDIR"):
        write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(root))
    assert files_under(tmp_path) == [root]


def test_write_fails_clearly_when_a_file_cannot_be_placed(tmp_path: Path) -> None:
    """When a file cannot be put in place (a directory stands at its path), the item fails naming
    the path, the cause is chained, and no temporary file is left."""
    (tmp_path / "sku-1" / "256.webp" / "x").mkdir(parents=True)
    with pytest.raises(OutputWriteError, match=r"could not write .*sku-1/256\.webp.*EISDIR") as info:
        write_item({"id": "sku-1", "thumbnails": [thumb()]}, root=str(tmp_path))
    assert isinstance(info.value.__cause__, OSError)
    assert files_under(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "sku-1").iterdir()) == ["256.webp"]


def test_write_refuses_two_thumbnails_with_one_name(tmp_path: Path) -> None:
    """Two thumbnails that would land on one path fail the item before anything is written."""
    with pytest.raises(ValueError, match=r"would both be written to 'sku-1/a\.png'"):
        write_item({"id": "sku-1", "thumbnails": [thumb("a", "PNG"), thumb("a", "PNG")]}, root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_write_needs_thumbnails(tmp_path: Path) -> None:
    """An item without a thumbnails list fails naming the stage to run first."""
    with pytest.raises(ValueError, match="run the thumbnail stage before write"):
        write_item({"id": "sku-1"}, root=str(tmp_path))


@pytest.mark.timeout(30)
async def test_thumbnail_then_write_through_the_engine(tmp_path: Path) -> None:
    """Through the engine, good images end as files and an HTML body is dead-lettered with its reason."""
    items = [
        {"id": "good", "body": images.photo_jpeg(800, 600), "content_type": "image/jpeg"},
        {"id": "html", "body": images.html_page(), "content_type": "text/html"},
    ]
    once = Retry(attempts=1)
    run = await run_stages_async(
        items,
        Stage(thumbnail, concurrency=2, retry=once, options={"sizes": [256, 64], "format": "PNG"}),
        Stage(write, retry=once, options={"root": str(tmp_path)}),
    )
    [out] = run.outputs
    assert out["outputs"] == ["good/256.png", "good/64.png"]
    assert Image.open(io.BytesIO((tmp_path / "good" / "256.png").read_bytes())).size == (256, 192)
    [dead] = run.dead_letters
    assert (dead["key"], dead["stage"]) == ("html", "thumbnail")
    assert "not a decodable image: cannot identify image file" in dead["message"]
    assert not any(name.startswith(".") for _, _, names in os.walk(tmp_path) for name in names)


STALE = ".256.webp.tmp-0123456789abcdef0123456789abcdef"
FRESH = ".1024.webp.tmp-fedcba9876543210fedcba9876543210"


def _plant_temp_files(root: Path, *, stale_age: float) -> tuple[Path, Path]:
    """A temporary file last modified ``stale_age`` seconds ago, and one modified just now."""
    (root / "k").mkdir(parents=True)
    stale, fresh = root / "k" / STALE, root / "k" / FRESH
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - stale_age
    os.utime(stale, (old, old))
    return stale, fresh


def _one_item_through_write(root: Path, **options: Any) -> Any:
    item = {"id": "sku-1", "thumbnails": [thumb()]}
    return run_stages_async(
        [item], Stage(write, retry=Retry(attempts=1), options={"root": str(root), **options})
    )


async def test_write_stage_removes_every_temp_file_when_no_other_run_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening the write stage on a tree no other run holds removes all temporary files, however
    recent (they can only be a killed run's), says how many, and leaves the outputs alone."""
    root = tmp_path / "out"
    stale, fresh = _plant_temp_files(root, stale_age=5)
    (root / "k" / "256.webp").write_bytes(b"earlier output")
    with caplog.at_level(logging.INFO, logger="stages.files"):
        run = await _one_item_through_write(root)
    assert run.report.items.ok == 1
    assert not stale.exists()
    assert not fresh.exists()
    assert (root / "k" / "256.webp").read_bytes() == b"earlier output"
    assert "stage 'write': removed 2 stale temporary files under" in caplog.text


async def test_write_stage_spares_recent_temp_files_while_another_run_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While another writer holds the root (its shared lock), only temporary files older than
    stale_after go: a recent one may be that writer's file in progress."""
    root = tmp_path / "out"
    stale, fresh = _plant_temp_files(root, stale_age=7200)
    other = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)  # what a running write stage holds
        with caplog.at_level(logging.INFO, logger="stages.files"):
            run = await _one_item_through_write(root)
    finally:
        os.close(other)
    assert run.report.items.ok == 1
    assert not stale.exists()
    assert fresh.exists()
    assert "removed 1 stale temporary file under" in caplog.text
    assert "another run is writing there: only those older than 3600s" in caplog.text


async def test_write_stage_holds_a_shared_lock_on_the_root_while_open(tmp_path: Path) -> None:
    """While a run's write stage is open, nobody can take the root exclusively (so a second run
    knows a writer is active); once the run ends, the lock is gone."""
    root = tmp_path / "out"
    seen: list[bool] = []

    def probe(item: dict[str, Any]) -> dict[str, Any]:
        fd = os.open(root, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
        finally:
            os.close(fd)
        return item

    await run_stages_async(
        [{"id": "sku-1", "thumbnails": [thumb()]}],
        Stage(write, options={"root": str(root)}),
        Stage(probe),
    )
    assert seen == [True]
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a lock was left behind
    finally:
        os.close(fd)


async def test_write_stage_fails_the_run_at_start_when_the_root_is_a_file(tmp_path: Path) -> None:
    """A root that cannot be a directory fails the run before any item, naming the path and the fix."""
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    with pytest.raises(ResourceError, match=r"stage 'write': could not prepare the output root .*not-a-dir"):
        await _one_item_through_write(root)
    assert files_under(tmp_path) == [root]


@pytest.mark.parametrize(("option", "value"), [("layout", "flat"), ("stale_after", -1)])
async def test_write_stage_refuses_bad_options(tmp_path: Path, option: str, value: object) -> None:
    """A bad layout or stale_after is refused when the stage is defined, naming the value; nothing runs."""
    with pytest.raises(ConfigError, match=f"option {option!r} = {value!r} is invalid"):
        await _one_item_through_write(tmp_path, **{option: value})
