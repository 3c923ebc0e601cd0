"""Tests for stages.image: real Pillow on real image bytes from tests.images."""

from __future__ import annotations

import io
import os
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image

from pipeline import ConfigError, Pipeline, Stage
from pipeline.testing import memory_source
from stages.image import (
    DEFAULT_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_estimate,
    thumbnail,
)
from tests import images

FORMATS = ("WEBP", "JPEG", "PNG")
# The modes a decoder may hand back for each output format.
OUTPUT_MODES = {"WEBP": {"RGB", "RGBA"}, "JPEG": {"RGB", "L"}, "PNG": {"RGB", "RGBA", "L", "LA"}}


def decode(data: bytes) -> Image.Image:
    """Fully decode encoded thumbnail bytes (load() raises on a broken file)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    """The pixel at ``xy`` as a tuple of ints, whatever the image's mode."""
    value = img.getpixel(xy)
    assert value is not None
    return tuple(int(v) for v in value) if isinstance(value, tuple) else (int(value),)


def run(body: bytes, **options: Any) -> dict[str, Any]:
    return thumbnail({"id": "k1", "body": body, "content_type": "image/test"}, **options)


def pillow_images_created() -> int:
    """How many images Pillow's C core has allocated so far in this process."""
    stats: dict[str, int] = Image.core.get_stats()  # type: ignore[attr-defined]
    return stats["new_count"]


def test_photo_gives_each_size_fitting_its_box() -> None:
    """A 1600x1200 photo gives a 1024x768 and a 256x192 WebP, in the order of ``sizes``."""
    result = run(images.photo_jpeg(1600, 1200))
    assert [(t["name"], t["size"], t["format"]) for t in result["thumbnails"]] == [
        ("1024", 1024, "WEBP"),
        ("256", 256, "WEBP"),
    ]
    for thumb, expected in zip(result["thumbnails"], [(1024, 768), (256, 192)], strict=True):
        img = decode(thumb["data"])
        assert (img.format, img.size, img.mode) == ("WEBP", expected, "RGB")
        assert (thumb["width"], thumb["height"]) == expected


def test_result_item_drops_body_and_keeps_other_fields() -> None:
    """The result has no body, keeps the other fields, and adds width, height and source_format."""
    item = {"id": "k1", "body": images.photo_jpeg(800, 600), "content_type": "image/jpeg", "sha256": "ab"}
    result = thumbnail(item, sizes=[100])
    assert "body" not in result
    assert (result["id"], result["content_type"], result["sha256"]) == ("k1", "image/jpeg", "ab")
    assert (result["width"], result["height"], result["source_format"]) == (800, 600, "JPEG")


def test_input_item_is_left_intact_for_a_retry() -> None:
    """The stage returns a new item; the input keeps its body, so a retry can decode it again."""
    item = {"id": "k1", "body": images.photo_jpeg(320, 240)}
    thumbnail(item, sizes=[64])
    assert isinstance(item["body"], bytes)
    assert "thumbnails" not in item


MAKERS: dict[str, Callable[[], bytes]] = {
    "RGB JPEG": lambda: images.photo_jpeg(640, 480),
    "L JPEG": images.grayscale_jpeg,
    "CMYK JPEG": images.cmyk_jpeg,
    "RGBA PNG": images.rgba_png,
    "RGBA WebP": images.rgba_webp,
    "P PNG with transparency": images.palette_png_with_transparency,
    "LA PNG": images.la_png,
    "1 PNG": images.bilevel_png,
    "I;16 PNG": images.i16_png,
    "I TIFF": images.int32_tiff,
    "F TIFF": images.float_tiff,
    "animated GIF": images.animated_gif,
    "animated WebP": images.animated_webp,
    "APNG": images.animated_png,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", list(MAKERS))
def test_every_mode_gives_valid_thumbnails(source: str, fmt: str) -> None:
    """Every common source mode gives decodable thumbnails of the right size and a mode ``fmt`` stores."""
    data = MAKERS[source]()
    with Image.open(io.BytesIO(data)) as src:
        w, h = src.size
    result = run(data, sizes=[256, 64], format=fmt)
    for thumb in result["thumbnails"]:
        scale = min(1.0, thumb["size"] / max(w, h))
        img = decode(thumb["data"])
        assert img.format == fmt
        assert img.size == (round(w * scale), round(h * scale))
        assert img.mode in OUTPUT_MODES[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_carries_no_exif_xmp_or_icc(fmt: str) -> None:
    """Thumbnails carry none of the source's EXIF, XMP or ICC profile."""
    result = run(images.photo_jpeg(640, 480, orientation=1, xmp=True, icc=True), sizes=[128], format=fmt)
    img = decode(result["thumbnails"][0]["data"])
    assert dict(img.getexif()) == {}
    assert not {"exif", "xmp", "XML:com.adobe.xmp", "icc_profile"} & set(img.info)


def test_exif_orientation_swaps_width_and_height() -> None:
    """A landscape-stored JPEG tagged orientation 6 is reported and thumbnailed as portrait."""
    result = run(images.photo_jpeg(640, 480, orientation=6), sizes=[256])
    assert (result["width"], result["height"]) == (480, 640)
    assert decode(result["thumbnails"][0]["data"]).size == (192, 256)


def test_exif_orientation_rotates_the_pixels() -> None:
    """Orientation 6 turns the picture clockwise: the stored top-left corner ends top-right."""
    src = Image.new("RGB", (400, 300), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 100, 100))  # a red stored top-left corner
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    result = run(images.encode(src, "JPEG", quality=95, exif=exif.tobytes()), sizes=[300], format="PNG")
    img = decode(result["thumbnails"][0]["data"]).convert("RGB")
    assert img.size == (225, 300)
    red, _, blue = pixel(img, (img.width - 10, 10))
    assert red > 200
    assert blue < 60


def test_never_upscales() -> None:
    """A source smaller than every box keeps its own size."""
    result = run(images.photo_jpeg(120, 90), sizes=[1024, 256])
    assert [decode(t["data"]).size for t in result["thumbnails"]] == [(120, 90), (120, 90)]


def test_large_jpeg_is_decoded_with_draft() -> None:
    """A 4000x3000 JPEG, which takes the reduced-scale (draft) decoding path, gives the right size."""
    result = run(images.photo_jpeg(4000, 3000), sizes=[512], format="JPEG")
    assert (result["width"], result["height"]) == (4000, 3000)
    assert decode(result["thumbnails"][0]["data"]).size == (512, 384)


@pytest.mark.parametrize("maker", [images.animated_gif, images.animated_webp, images.animated_png])
def test_animation_gives_its_first_frame(maker: Callable[[], bytes]) -> None:
    """An animated GIF, WebP or APNG is thumbnailed from its first (red) frame."""
    result = run(maker(), sizes=[64], format="PNG")
    red, green, blue = pixel(decode(result["thumbnails"][0]["data"]).convert("RGB"), (32, 24))
    assert (red > 240, green < 16, blue < 16) == (True, True, True)


def test_jpeg_flattens_transparency_on_white() -> None:
    """JPEG has no alpha: transparent pixels become white, opaque ones keep their colour."""
    result = run(images.rgba_png(800, 600), sizes=[200], format="JPEG")
    img = decode(result["thumbnails"][0]["data"])
    assert img.mode == "RGB"
    assert min(pixel(img, (1, 75))) > 245
    assert min(pixel(img, (img.width - 2, 75))) < 245


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_palette_transparency_is_kept(fmt: str) -> None:
    """A palette PNG's transparent index stays transparent in WebP and PNG."""
    result = run(images.palette_png_with_transparency(640, 480), sizes=[160], format=fmt)
    img = decode(result["thumbnails"][0]["data"])
    assert img.mode == "RGBA"
    assert pixel(img, (5, 60))[3] == 0
    assert pixel(img, (img.width - 5, 60))[3] == 255


@pytest.mark.parametrize("maker", [images.i16_png, images.int32_tiff, images.float_tiff])
def test_high_bit_depth_is_scaled_not_clipped(maker: Callable[[], bytes]) -> None:
    """16-bit, 32-bit and float ramps map onto 0..255 across the width (a clipping convert
    would turn most of the ramp white)."""
    result = run(maker(), sizes=[256], format="PNG")
    img = decode(result["thumbnails"][0]["data"])
    assert img.mode == "L"
    assert pixel(img, (0, 10))[0] <= 5
    assert 110 < pixel(img, (img.width // 2, 10))[0] < 145
    assert pixel(img, (img.width - 1, 10))[0] >= 250


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (images.empty_bytes, "the body is empty"),
        (images.garbage_bytes, "cannot identify image file"),
        (images.html_page, "cannot identify image file"),
        (images.truncated_jpeg, "image file is truncated"),
    ],
)
def test_undecodable_input_fails_with_the_reason(maker: Callable[[], bytes], reason: str) -> None:
    """Empty, garbage, HTML and truncated bodies fail with the reason, the size and the content type."""
    data = maker()
    with pytest.raises(ImageDecodeError, match="not a decodable image") as info:
        thumbnail({"id": 1, "body": data, "content_type": "text/html"})
    assert reason in str(info.value)
    assert f"({len(data)} bytes, content type text/html)" in str(info.value)


def test_missing_body_fails_naming_the_field() -> None:
    """An item without body bytes fails naming the field and the fix."""
    with pytest.raises(ImageDecodeError, match=r"no image bytes in 'body'.*download stage"):
        thumbnail({"id": 1})


def test_bomb_over_max_pixels_is_rejected_without_decoding() -> None:
    """An 8000x8000 PNG (64 M pixels, 90 KB) is rejected from its header; no pixel buffer is made.

    tracemalloc sees Python-side allocations; Pillow's own counter sees its C pixel buffers,
    which tracemalloc cannot see. Decoding would have needed 64 MB.
    """
    bomb = images.png_bomb(8000, 8000)
    reason = "8000x8000 = 64,000,000 pixels, over max_pixels = 40,000,000"
    created = pillow_images_created()
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=reason):
            run(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert pillow_images_created() == created


def test_bomb_over_pillows_hard_limit_is_rejected() -> None:
    """A 30000x30000 PNG, over Pillow's own hard limit, fails as too large (not as a raw Pillow error)."""
    bomb = images.png_bomb()
    created = pillow_images_created()
    with pytest.raises(ImageTooLargeError, match="possible decompression bomb"):
        run(bomb, max_pixels=10**10)
    assert pillow_images_created() == created


def test_pillow_bomb_warning_as_error_is_translated() -> None:
    """Where warnings are errors, Pillow's DecompressionBombWarning becomes ImageTooLargeError."""
    bomb = images.png_bomb(10_000, 10_000)  # over Pillow's warning limit, under its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="possible decompression bomb") as info:
            run(bomb, max_pixels=10**9)
    assert isinstance(info.value.__cause__, Image.DecompressionBombWarning)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sizes": [256, 256]}, "sizes must be distinct"),
        ({"sizes": []}, "non-empty"),
        ({"quality": 0}, "quality must be between 1 and 100, got 0"),
        ({"format": "GIF"}, "format must be one of"),
        ({"sizes": [1024, "256"]}, "sizes\\[1\\] must be an integer, got '256'"),
        ({"sizes": [1024, True]}, "sizes\\[1\\] must be an integer, got True"),
        ({"formats": []}, "formats must be non-empty"),
        ({"formats": ["JPG"]}, "'JPG' is not a format Pillow can open.*'JPEG'"),
        ({"formats": "JPEG"}, "formats"),
    ],
)
def test_direct_call_checks_options(options: dict[str, Any], message: str) -> None:
    """Called directly, bad options fail with a message naming the value."""
    with pytest.raises(ValueError, match=message):
        run(images.photo_jpeg(64, 48), **options)


def test_stage_definition_checks_options() -> None:
    """As a pipeline Stage, a bad option is refused when the pipeline is defined."""
    with pytest.raises(ConfigError, match="quality"):
        Stage(thumbnail, options={"quality": 101})


@pytest.fixture
def ghostscript_tripwire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a real ``gs`` executable first on PATH that records any run of it, and make Pillow
    look for Ghostscript afresh; returns the file that exists once ``gs`` has run."""
    bin_dir, ran = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {ran}\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is
    return ran


def test_eps_is_refused_without_running_ghostscript(ghostscript_tripwire: Path) -> None:
    """An EPS body (which Pillow decodes by running Ghostscript) is refused by the default
    formats allow-list, naming the format and the fix; no Ghostscript process is started."""
    with pytest.raises(ImageDecodeError, match=r"identify it as EPS.*not in formats") as info:
        run(images.eps())
    assert "add 'EPS' to formats" in str(info.value)
    assert not ghostscript_tripwire.exists()


def test_eps_estimate_never_runs_ghostscript(ghostscript_tripwire: Path) -> None:
    """The memory estimate of an EPS body is 0 and starts no Ghostscript process either."""
    assert decode_estimate({"body": images.eps()}) == 0
    assert not ghostscript_tripwire.exists()


@pytest.mark.parametrize(
    ("maker", "fmt"),
    [
        (images.ppm, "PPM"),
        (lambda: images.dds_unimplemented("pfflags"), "DDS"),
        (lambda: images.encode(images.photo_image(32, 32), "ICO"), "ICO"),
        (lambda: images.encode(images.photo_image(32, 32), "PCX"), "PCX"),
    ],
)
def test_format_outside_the_allow_list_is_refused_naming_it(maker: Callable[[], bytes], fmt: str) -> None:
    """A real image in a format the allow-list leaves out fails as ImageDecodeError, naming the
    format as identified from its first bytes and how to allow it; Pillow's decoder never runs."""
    body = maker()
    created = pillow_images_created()
    with pytest.raises(ImageDecodeError, match=f"identify it as {fmt}, which is not in formats") as info:
        run(body)
    assert f"add {fmt!r} to formats" in str(info.value)
    assert pillow_images_created() == created


def test_format_added_to_the_allow_list_is_decoded() -> None:
    """Allowing a format (in any case) lets its images through."""
    result = run(images.ppm(64, 48), formats=["ppm", "jpeg"], sizes=[32])
    assert (result["source_format"], result["thumbnails"][0]["width"]) == ("PPM", 32)


def test_allow_list_without_the_format_refuses_even_jpeg() -> None:
    """The allow-list is the whole list: formats=["PNG"] refuses a JPEG."""
    with pytest.raises(ImageDecodeError, match="identify it as JPEG, which is not in formats"):
        run(images.photo_jpeg(64, 48), formats=["PNG"])


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("pfflags", "Unknown pixel format flags 0"),
        ("fourcc", "Unimplemented pixel format"),
        ("dxgi", "Unimplemented DXGI format 999"),
    ],
)
def test_pillow_not_implemented_error_becomes_a_decode_error(kind: str, reason: str) -> None:
    """A format Pillow knows but whose variant it cannot decode (it raises NotImplementedError,
    as for three of Pillow's own DDS test images) fails as ImageDecodeError with the reason."""
    with pytest.raises(ImageDecodeError, match="not a decodable image") as info:
        run(images.dds_unimplemented(kind), formats=["DDS"])
    assert reason in str(info.value)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_format_options_are_taken_in_any_case() -> None:
    """format = "jpeg" means "JPEG", and formats entries are normalised too, in a run's options
    as on a direct call."""
    stage = Stage(thumbnail, options={"format": "jpeg", "formats": ["jpeg", "Png"]})
    assert stage.options["format"] == "JPEG"
    assert list(stage.options["formats"]) == ["JPEG", "PNG"]
    result = run(images.photo_jpeg(64, 48), format="webp", sizes=[32])
    assert result["thumbnails"][0]["format"] == "WEBP"
    assert decode(result["thumbnails"][0]["data"]).format == "WEBP"


def test_default_formats_are_photo_formats() -> None:
    """The default allow-list holds the usual photo and web formats, and nothing that runs an
    outside interpreter (EPS, PDF)."""
    assert set(DEFAULT_FORMATS) == {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"}


def test_estimate_reads_the_header_without_decoding() -> None:
    """The memory estimate of a JPEG comes from its header (at the draft scale thumbnail
    decodes at), with no pixel buffer made."""
    body = images.photo_jpeg(4000, 3000)
    created = pillow_images_created()
    estimate = decode_estimate({"body": body})
    assert pillow_images_created() == created
    # 4000x3000 drafted for a 1024 box is decoded at 1/2 scale: 2000x1500, 4 bytes a pixel, x2.
    assert estimate == 2000 * 1500 * 4 * 2


def test_estimate_of_a_png_is_its_full_size() -> None:
    """A PNG has no draft mode: the estimate is its full declared size."""
    assert decode_estimate({"body": images.rgba_png(300, 200)}) == 300 * 200 * 4 * 2


@pytest.mark.parametrize(
    "item",
    [
        {},
        {"body": None},
        {"body": b""},
        {"body": images.garbage_bytes()},
        {"body": images.html_page()},
        {"body": images.png_bomb()},
        {"body": images.png_bomb(8000, 8000)},
    ],
)
def test_estimate_is_zero_for_what_thumbnail_refuses_before_decoding(item: dict[str, Any]) -> None:
    """No body, not an image, or a bomb over the default max_pixels: nothing will be decoded."""
    assert decode_estimate(item) == 0


async def test_thumbnail_declares_its_estimate_to_the_memory_budget() -> None:
    """Through the engine with a memory budget, a thumbnail attempt is charged its estimate on
    top of the item's body."""
    body = images.photo_jpeg(2000, 1500)
    pipeline = Pipeline(
        source=memory_source([{"id": 1, "body": body}]),
        stages=[Stage(thumbnail, options={"sizes": [64]})],
        report_dir=None,
        ledger=False,
        memory_budget="1GiB",
    )
    report = await pipeline.run_async(progress=False)
    assert report.items.ok == 1
    assert report.memory["peak_charged_bytes"] >= len(body) + decode_estimate({"body": body}) > len(body)


def test_estimate_of_a_tiff_finds_its_directory_after_the_pixels() -> None:
    """A compressed TIFF keeps its directory after the pixel data: the estimate still reads it."""
    body = images.encode(images.photo_image(400, 300), "TIFF", compression="tiff_lzw")
    assert int.from_bytes(body[4:8], "little") > len(body) // 2  # the directory is at the end
    assert decode_estimate({"body": body}) == 400 * 300 * 8


def test_estimate_parses_only_the_head_of_a_body() -> None:
    """A JPEG whose frame header comes after 5 MB of metadata segments is not walked on the event
    loop: the estimate gives up at the head and counts 0 (the stage still decodes it)."""
    jpeg = images.photo_jpeg(64, 48)
    segment = b"\xff\xef" + (65535).to_bytes(2, "big") + bytes(65533)  # an APP15 segment, 64 KiB
    body = jpeg[:2] + segment * 80 + jpeg[2:]
    assert decode_estimate({"body": body}) == 0
    assert run(body)["width"] == 64


class _CountingDecoder:
    """A real Pillow decoder that counts the calls it is given (each releases the GIL once)."""

    def __init__(self, real: Any, calls: list[int]) -> None:
        self._real = real
        self._calls = calls

    def decode(self, buffer: bytes) -> Any:
        self._calls.append(len(buffer))
        return self._real.decode(buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_decoder_gets_the_body_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body larger than Pillow's 64 KiB pieces reaches the decoder in one call (so the thread
    takes the GIL back once, not once per piece)."""
    body = images.photo_jpeg(1600, 1200, seed=3)
    assert len(body) > 4 * 65536
    calls: list[int] = []
    real = Image._getdecoder

    def counting(*args: Any, **kwargs: Any) -> Any:
        return _CountingDecoder(real(*args, **kwargs), calls)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    out = thumbnail({"id": 1, "body": body}, sizes=(1024, 256), format="JPEG")
    assert [t["width"] for t in out["thumbnails"]] == [1024, 256]
    assert len(calls) == 1
    assert calls[0] >= len(body) - 4096  # the whole body, less the header Pillow already parsed


@pytest.mark.parametrize(
    "make",
    [
        lambda: images.photo_jpeg(1600, 1200, seed=4),
        lambda: images.encode(images.photo_image(900, 700, seed=5), "JPEG", progressive=True),
        lambda: images.encode(images.photo_image(900, 700, seed=6), "PNG"),
        images.truncated_jpeg,
    ],
    ids=["jpeg", "progressive-jpeg", "png", "truncated-jpeg"],
)
def test_one_piece_decoding_gives_the_same_thumbnails(
    make: Callable[[], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing the decoder the body in one piece changes no byte of the thumbnails (nor the error
    on a truncated body) against Pillow's own 64 KiB pieces."""

    def run() -> Any:
        try:
            out = thumbnail({"id": 1, "body": body}, sizes=(1024, 256), format="JPEG")
        except ImageDecodeError as exc:
            return str(exc)
        return [t["data"] for t in out["thumbnails"]]

    body = make()
    one_piece = run()
    monkeypatch.setattr("stages.image._DECODE_BLOCK", 0)  # Pillow's own pieces
    assert run() == one_piece
