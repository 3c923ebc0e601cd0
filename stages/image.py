"""Image stages: decode a downloaded body with Pillow and make thumbnails of it.

:func:`thumbnail` is a plain ``def``: the engine runs it in its thread pool, where Pillow's
decoders, resamplers and encoders run with the GIL released.

Design choice, measured (``bench/gil_encode.py``, 2 cores, Pillow 12.3, 1600x1200 photo-like
JPEG sources, 1024 px and 256 px thumbnails, images per second with 1 and 2 threads)::

    workload  format  dest      1 thread  2 threads  speed-up
    encode    WEBP    BytesIO     14.7      28.9       1.97
    encode    WEBP    file        14.3      28.6       2.00
    encode    JPEG    BytesIO    497.5     490.0       0.99
    encode    JPEG    file       402.1     823.1       2.05
    full      WEBP    BytesIO      9.1      18.2       1.99
    full      WEBP    file         8.9      17.0       1.91
    full      JPEG    BytesIO     25.3      49.6       1.96
    full      JPEG    file        22.7      45.1       1.98

Encoding JPEG into a ``BytesIO`` does hold the GIL (no gain from a second thread), but it takes
about 2 ms per item, against some 40 ms for decoding and resizing, which do release it. WebP
releases the GIL either way. For the whole per-item work ("full") the destination makes no
difference worth its cost, so thumbnails are encoded in memory and handed on as ``data``;
:func:`stages.files.write` writes them. That keeps the item conventions as they are and lets a
failed write be retried without decoding again.

Item fields: reads ``body`` (bytes) and, for error messages, ``content_type``. Returns a new
item without ``body``, with ``width`` and ``height`` (of the full-size source after EXIF
orientation), ``source_format`` (Pillow's name, for example ``"JPEG"``) and ``thumbnails``: one
``{"name", "size", "format", "width", "height", "data"}`` dict per requested size, in order.
"""

from __future__ import annotations

import collections
import io
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import pydantic
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import cpu_bound

from ._options import FieldName, PositiveInt, checked_options

__all__ = ["ImageDecodeError", "ImageTooLargeError", "thumbnail"]

OutputFormat = Literal["JPEG", "WEBP", "PNG"]

_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 turn the picture by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = 255
# What Pillow raises on a corrupt or truncated stream while identifying or decoding it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


def _distinct(sizes: Sequence[int]) -> Sequence[int]:
    repeated = sorted(size for size, count in collections.Counter(sizes).items() if count > 1)
    if repeated:
        raise ValueError(
            f"sizes must be distinct (a thumbnail is named after its size), got {list(sizes)!r}; "
            f"drop the repeated {', '.join(map(str, repeated))}"
        )
    return sizes


Sizes = Annotated[Sequence[PositiveInt], pydantic.Field(min_length=1), pydantic.AfterValidator(_distinct)]
"""Thumbnail sizes in pixels: at least one, each >= 1, no two alike."""

Quality = Annotated[PositiveInt, pydantic.Field(le=100)]
"""Encoder quality, 1 to 100."""


class ImageDecodeError(ValueError):
    """The body is not an image Pillow can decode (empty, truncated, corrupt or not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than allowed; it was rejected before any pixel was decoded."""


@cpu_bound  # with concurrency = "auto": tuned by throughput, capped at the cores
@checked_options  # the engine checks a run's options; this checks a direct call's, once per set
def thumbnail(
    item: dict[str, Any],
    *,
    sizes: Sizes = (1024, 256),
    format: OutputFormat = "WEBP",
    quality: Quality = 85,
    max_pixels: PositiveInt = 40_000_000,
    body_field: FieldName = "body",
) -> dict[str, Any]:
    """Decode the item's image and make one thumbnail per size.

    Each thumbnail fits within ``size`` x ``size``, keeps the aspect ratio and is never larger
    than the source. EXIF orientation is applied; animated images give their first frame;
    transparency is kept (WebP, PNG) or flattened on white (JPEG). Output carries no EXIF, XMP
    or ICC metadata: colour-managed sources are converted to sRGB first.

    Args:
        item: The item; ``item[body_field]`` holds the encoded image.
        sizes: The bounding-box sizes in pixels, each distinct; a thumbnail is named after its size.
        format: Output format.
        quality: Encoder quality, 1 to 100, for JPEG and WebP (PNG is lossless and ignores it).
        max_pixels: Reject images declaring more pixels than this, before decoding any. Pillow's
            own limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice that for a hard error) applies too.
        body_field: The field holding the encoded image.

    Returns:
        A new item: ``item`` without ``body_field``, plus ``width``, ``height``,
        ``source_format`` and ``thumbnails``.

    Raises:
        ImageDecodeError: The body is missing, empty, truncated, corrupt or not an image.
        ImageTooLargeError: The image declares more than ``max_pixels`` pixels.
        ConfigError: On a direct call, an option is invalid (also a ``ValueError``); in a run
            the engine refuses it when the stage is defined, before any item runs.
    """
    body = item.get(body_field)
    content_type = item.get("content_type")
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ImageDecodeError(
            f"item has no image bytes in {body_field!r} (found {type(body).__name__}); run a download "
            "stage before thumbnail, or set body_field to the field that holds the image"
        )
    data = bytes(body)
    with _open(data, content_type, max_pixels) as img:
        source_format = img.format or "unknown"
        stored_w, stored_h = img.size
        # Decode JPEGs at the smallest DCT scale still at least as large as the biggest thumbnail.
        img.draft(None, _fit(stored_w, stored_h, max(sizes)))
        _load(img, data, content_type)
        orientation = _orientation(img)
        swap = orientation in _SWAPPING_ORIENTATIONS
        width, height = (stored_h, stored_w) if swap else (stored_w, stored_h)
        # Everything below stays inside the block: closing an opened image discards its pixels.
        encoded: dict[int, dict[str, Any]] = {}
        try:
            current = _normalise(ImageOps.exif_transpose(img) if orientation != 1 else img)
            # Largest first, each made from the previous one: cheaper than resampling the source.
            for size in sorted(sizes, reverse=True):
                current = _resize(current, _fit(width, height, size))
                encoded[size] = _encode(current, size, format, quality)
        except _DECODE_ERRORS as exc:
            # A decoded image Pillow cannot convert or encode (an exotic mode, a broken profile).
            raise ImageDecodeError(
                f"could not make {format} thumbnails of this {source_format} image in mode {img.mode}: "
                f"{exc} ({_describe(data, content_type)})"
            ) from exc
    result = {k: v for k, v in item.items() if k != body_field}
    result.update(
        width=width,
        height=height,
        source_format=source_format,
        thumbnails=[encoded[size] for size in sizes],
    )
    return result


def _describe(data: bytes, content_type: object) -> str:
    return f"{len(data)} bytes, content type {content_type or 'unknown'}"


def _open(data: bytes, content_type: object, max_pixels: int) -> Image.Image:
    """Identify the image from its header, without decoding pixels, and enforce ``max_pixels``.

    This is the one place where Pillow's identification errors are translated.
    """
    if not data:
        raise ImageDecodeError(f"not a decodable image: the body is empty ({_describe(data, content_type)})")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        # Pillow's message ends with the BytesIO's repr, which tells an operator nothing.
        raise ImageDecodeError(
            f"not a decodable image: cannot identify image file ({_describe(data, content_type)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow checks its own global limit inside open(); the warning arrives here as an
        # exception only when warnings are errors (as under pytest), otherwise it is just logged
        # and the check below rejects the image anyway whenever max_pixels is below Pillow's limit.
        raise ImageTooLargeError(
            f"image rejected before decoding, as a possible decompression bomb: {exc} "
            f"({_describe(data, content_type)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"not a decodable image: {exc} ({_describe(data, content_type)})") from exc
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        img.close()
        if w < 1 or h < 1:
            raise ImageDecodeError(
                f"not a decodable image: it declares a size of {w}x{h} pixels "
                f"({_describe(data, content_type)})"
            )
        raise ImageTooLargeError(
            f"image rejected before decoding, as a possible decompression bomb: it declares {w}x{h} = "
            f"{w * h:,} pixels, over max_pixels = {max_pixels:,} ({_describe(data, content_type)}); "
            "raise max_pixels if such images are expected"
        )
    return img


def _load(img: Image.Image, data: bytes, content_type: object) -> None:
    """Decode the first frame, translating Pillow's errors on corrupt or truncated data."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Formats whose frames may grow (GIF) check again while decoding.
        raise ImageTooLargeError(
            f"image rejected while decoding, as a possible decompression bomb: {exc} "
            f"({_describe(data, content_type)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"not a decodable image: {exc} ({_describe(data, content_type)})") from exc


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return 1  # a broken EXIF block: show the pixels as stored rather than fail the image
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of ``width`` x ``height`` scaled to fit ``box`` x ``box``, never enlarged."""
    longest = max(width, height)
    if longest <= box:
        return width, height
    return max(1, round(width * box / longest)), max(1, round(height * box / longest))


def _normalise(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to one of L, LA, RGB, RGBA: 8 bits a channel, sRGB."""
    img = _to_srgb(img)
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode in ("La", "RGBa"):
        return img.convert(mode.upper())
    if mode.startswith("I;16"):
        # 16-bit samples: scale the full 0..65535 range to 0..255 (a plain convert would clip).
        return _stretch(img.convert("I"), 0, 65535)
    if mode in ("I", "F"):
        extrema = img.getextrema()
        # A one-band image gives (low, high); the cast is for the type checker only.
        low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
        if mode == "F" and 0 <= low and high <= 1:
            return _stretch(img, 0, 1)  # float images are usually 0.0..1.0
        if 0 <= low and high <= 255:
            return img.convert("L")
        if 0 <= low and high <= 65535:
            return _stretch(img, 0, 65535)
        return _stretch(img, low, high)
    # CMYK, YCbCr, LAB, HSV, RGBX and the rest.
    return img.convert("RGBA" if img.has_transparency_data else "RGB")


def _stretch(img: Image.Image, low: float, high: float) -> Image.Image:
    """Map samples of an ``I`` or ``F`` image linearly from ``low..high`` to ``0..255``, as ``L``."""
    scale = 255.0 / (high - low) if high > low else 0.0
    offset = -low * scale
    return img.point(lambda v: v * scale + offset).convert("L")


def _to_srgb(img: Image.Image) -> Image.Image:
    """Convert a colour-managed RGB or CMYK image to sRGB, since the output drops its ICC profile."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littlecms: keep the pixels as they are
        return img
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        rgb = img.convert("RGB") if alpha else img
        converted = ImageCms.profileToProfile(rgb, source, srgb, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img  # a broken or unsupported profile: keep the pixels rather than fail the image
    if converted is None:  # only when converting in place, which this does not ask for
        return img
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if img.size == size:
        return img
    # reducing_gap: a fast box reduction first, then LANCZOS over the last factor of 3.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _for_format(img: Image.Image, format: str) -> Image.Image:
    """Convert a thumbnail in L, LA, RGB or RGBA to a mode ``format`` can store."""
    if format == "JPEG":
        if img.mode in ("LA", "RGBA"):
            # JPEG has no alpha: composite onto white, as a browser shows it on a white page.
            base = Image.new(img.mode[:-1], img.size, _WHITE if img.mode == "LA" else (_WHITE,) * 3)
            base.paste(img, mask=img.getchannel("A"))
            return base
        return img
    if format == "WEBP":
        if img.mode == "L":
            return img.convert("RGB")
        if img.mode == "LA":
            return img.convert("RGBA")
    return img  # PNG stores all four


def _encode(img: Image.Image, size: int, format: str, quality: int) -> dict[str, Any]:
    out = _for_format(img, format)
    # Image.info travels through convert() and resize(); savers read EXIF, XMP and ICC from it.
    # (When out is img, clearing it is harmless: the smaller thumbnails need none of it either.)
    out.info = {}
    params: dict[str, Any]
    if format == "JPEG":
        params = {"quality": quality, "optimize": True}
    elif format == "WEBP":
        params = {"quality": quality, "method": 4}
    else:
        params = {"optimize": False}
    buf = io.BytesIO()
    out.save(buf, format=format, **params)
    return {
        "name": str(size),
        "size": size,
        "format": format,
        "width": out.width,
        "height": out.height,
        "data": buf.getvalue(),
    }
