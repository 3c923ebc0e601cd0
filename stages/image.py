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

Formats: only the source formats in the ``formats`` allow-list are opened (by default
:data:`DEFAULT_FORMATS`: JPEG, PNG, WebP, GIF, TIFF, BMP). Pillow can read dozens more, some
through large or outside decoders (EPS and PDF run Ghostscript, a PostScript interpreter);
an image in any other format is refused before its decoder runs, naming the format its first
bytes identify.

Memory: :func:`thumbnail` declares what an attempt allocates (:func:`decode_estimate`, read
from the image's header) for the engine's ``memory_budget``.

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
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

import pipeline

from ._options import FieldName, PositiveInt, UpperCase, checked_options

__all__ = [
    "DEFAULT_FORMATS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "decode_estimate",
    "thumbnail",
]

OutputFormat = Annotated[Literal["JPEG", "WEBP", "PNG"], UpperCase]
"""The thumbnails' format, in any case (``"jpeg"`` is ``"JPEG"``)."""

DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
"""The source formats :func:`thumbnail` opens unless told otherwise: photo and web formats.
(Pillow opens multi-picture JPEGs, MPO, as JPEG.)"""

DEFAULT_MAX_PIXELS = 40_000_000
"""The default ``max_pixels`` of :func:`thumbnail`."""

_DEFAULT_LARGEST = 1024  # the largest of thumbnail's default sizes
_HEADER_BYTES = 256 * 1024  # what decode_estimate parses: headers, EXIF, ICC and XMP fit in it
_DECODE_BLOCK = 8 * 1024 * 1024  # the most of a body handed to the decoder in one call (a copy)
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # little, big endian; classic, BigTIFF

_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 turn the picture by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = 255
# What Pillow raises on a corrupt or truncated stream while identifying or decoding it, and
# what its plugins raise on a variant they do not implement (NotImplementedError, a
# RuntimeError) or trip over internally (KeyError, ZeroDivisionError, OverflowError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    LookupError,
    TypeError,
    struct.error,
    RuntimeError,
    ArithmeticError,
)
# Formats whose decoder runs an outside program: said so when they are refused.
_OUTSIDE_DECODERS = {"EPS": "Ghostscript", "PDF": "Ghostscript"}
# Names people write for a format, and Pillow's name for it, for the error message.
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "PS": "EPS"}


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


def _source_format(value: object, info: pydantic.ValidationInfo) -> object:
    if not isinstance(value, str):
        return value  # the str check refuses it, naming the value
    name = value.upper()
    Image.init()  # registers every plugin, so Image.OPEN lists all Pillow can read
    if name not in Image.OPEN:
        hint = f"did you mean {_ALIASES[name]!r}? Use" if name in _ALIASES else "use"
        raise ValueError(
            f"{info.field_name}: {value!r} is not a format Pillow can open; {hint} Pillow's names, "
            f"such as {', '.join(map(repr, DEFAULT_FORMATS))} (all: {', '.join(sorted(Image.OPEN))})"
        )
    return name


SourceFormat = Annotated[str, pydantic.BeforeValidator(_source_format)]
"""A format Pillow can open, by Pillow's name, in any case (``"jpeg"`` is ``"JPEG"``)."""

Formats = Annotated[Sequence[SourceFormat], pydantic.Field(min_length=1)]
"""The allow-list of source formats: at least one."""


class ImageDecodeError(ValueError):
    """The body is not an image Pillow can decode (empty, truncated, corrupt or not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than allowed; it was rejected before any pixel was decoded."""


def _bytes_per_pixel(mode: str) -> int:
    """What decoding and normalising a pixel of ``mode`` holds at once, in bytes.

    Pillow stores every mode of more than one band, and the 32-bit ones, in 4 bytes a pixel;
    ``1``, ``L`` and ``P`` in one. Doubled for the copy the conversion to L/RGB/RGBA or the
    first reduction makes while the decoded image is still held; 16- and 32-bit greyscale go
    through two 32-bit copies (convert, then stretch) on top of the decoded one.
    """
    if mode in ("1", "L"):
        return 2
    if mode.startswith("I;16") or mode in ("I", "F"):
        return 12
    return 8


def decode_estimate(item: dict[str, Any]) -> int:
    """What a :func:`thumbnail` attempt with default options allocates for ``item``, in bytes.

    Read from the image's header, without decoding a pixel: the size it declares (a JPEG at
    the reduced scale its decoder draws for the largest default size, 1024 px), times what a
    pixel holds while decoded and converted (see ``_bytes_per_pixel``). Measured on 36 MP
    sources (``bench/hostile_memory.py``), Pillow's peak is about two thirds of it (JPEG:
    11.4 MiB against 17.2; PNG: 179 MiB against 276). It costs about 0.1 ms on a 36 MP JPEG and
    parses only the first 256 KiB (all of a TIFF, whose directory is found by seeking).

    It counts 0 for a body it cannot identify from that head, for formats outside
    :data:`DEFAULT_FORMATS` (their parsers are not run on the event loop) and for images over
    the default ``max_pixels`` (refused before decoding). The engine hands it the item only,
    not the stage's options: with ``sizes`` above 1024 a JPEG is decoded at a larger scale
    than assumed (up to 4x the pixels per doubling), and ``body_field`` is taken as ``"body"``.

    Args:
        item: The item; ``item["body"]`` holds the encoded image.

    Returns:
        The estimate in bytes, never negative; it never raises.
    """
    body = item.get("body")
    if not isinstance(body, bytes | bytearray | memoryview) or not body:
        return 0
    try:
        # A TIFF's directory is often after its pixels; it is found by seeking, so still cheap.
        size = _declared(body, bytes(body[:4]) not in _TIFF_MAGIC)
    except Exception:  # an estimate is advice: whatever Pillow raises, nothing will be decoded
        return 0
    if size is None:
        return 0
    w, h, mode = size
    return w * h * _bytes_per_pixel(mode)


class _Head(io.BytesIO):
    """The first :data:`_HEADER_BYTES` of a body, read in place: later bytes read as the end.

    The estimate runs on the event loop, and walking a body of 50 MB of metadata segments
    takes Pillow some 85 ms; the stage itself parses it all, in its thread.
    """

    def read(self, size: int | None = -1) -> bytes:
        left = _HEADER_BYTES - self.tell()
        if left <= 0:
            return b""
        return super().read(left if size is None or size < 0 else min(size, left))


def _declared(data: bytes | bytearray | memoryview, head_only: bool) -> tuple[int, int, str] | None:
    """Width, height and mode as a thumbnail decodes them, from the header; ``None`` when
    nothing will be decoded. Pillow's errors go to the caller."""
    fp = _Head(data) if head_only else io.BytesIO(data)  # a bytes body is shared, not copied
    with Image.open(fp, formats=DEFAULT_FORMATS) as img:
        w, h = img.size
        if w < 1 or h < 1 or w * h > DEFAULT_MAX_PIXELS:
            return None
        img.draft(None, _fit(w, h, _DEFAULT_LARGEST))  # a no-op but for JPEG
        return img.size[0], img.size[1], img.mode


@pipeline.weighs(decode_estimate)  # for memory_budget: the decoded pixels, from the header
@pipeline.cpu_bound  # with concurrency = "auto": tuned by throughput, capped at the cores
@checked_options  # the engine checks a run's options; this checks a direct call's, once per set
def thumbnail(
    item: dict[str, Any],
    *,
    sizes: Sizes = (1024, 256),
    format: OutputFormat = "WEBP",
    quality: Quality = 85,
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS,
    formats: Formats = DEFAULT_FORMATS,
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
        format: Output format, in any case.
        quality: Encoder quality, 1 to 100, for JPEG and WebP (PNG is lossless and ignores it).
        max_pixels: Reject images declaring more pixels than this, before decoding any. Pillow's
            own limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice that for a hard error) applies too.
        formats: The source formats to open, by Pillow's names, in any case; an image in any
            other is refused before its decoder runs. Add ``"EPS"`` or ``"PDF"`` only for
            trusted sources: Pillow decodes them by running Ghostscript.
        body_field: The field holding the encoded image.

    Returns:
        A new item: ``item`` without ``body_field``, plus ``width``, ``height``,
        ``source_format`` and ``thumbnails``.

    Raises:
        ImageDecodeError: The body is missing, empty, truncated, corrupt, not an image, in a
            format outside ``formats``, or in a variant Pillow does not implement.
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
    with _open(data, content_type, max_pixels, formats) as img:
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


def _identify(data: bytes) -> str | None:
    """The format Pillow would take ``data`` for, from its first bytes alone (no plugin's
    parser runs), or ``None``."""
    Image.init()
    prefix = data[:16]  # what Image.open hands the plugins' checks
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue  # a format without a magic-number check: nothing to say from the bytes
        try:
            found = accept(prefix)
        except Exception:  # a check that trips over a short prefix: not this format
            continue
        if found and not isinstance(found, str):  # a str is a warning, not a match
            return name
    return None


def _open(data: bytes, content_type: object, max_pixels: int, formats: Sequence[str]) -> Image.Image:
    """Identify the image from its header, without decoding pixels, and enforce ``formats`` and
    ``max_pixels``.

    This is the one place where Pillow's identification errors are translated.
    """
    if not data:
        raise ImageDecodeError(f"not a decodable image: the body is empty ({_describe(data, content_type)})")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError as exc:
        found = _identify(data)
        if found is not None and found not in formats:
            outside = _OUTSIDE_DECODERS.get(found)
            risk = (
                f" (Pillow decodes {found} by running {outside}: only for trusted sources)" if outside else ""
            )
            raise ImageDecodeError(
                f"image format not allowed: its first bytes identify it as {found}, which is not in "
                f"formats = {list(formats)!r}; add {found!r} to formats if such images are expected"
                f"{risk} ({_describe(data, content_type)})"
            ) from exc
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
        raise ImageDecodeError(
            f"not a decodable image: {_reason(exc, _identify(data))} ({_describe(data, content_type)})"
        ) from exc
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
    """Decode the first frame, translating Pillow's errors on corrupt or truncated data.

    The encoded bytes go to the decoder in one piece (up to :data:`_DECODE_BLOCK`), not Pillow's
    64 KiB: each piece is one call that releases the GIL and must take it back, and with other
    threads running Python (the downloads, the event loop) each taking back can wait up to a
    switch interval (5 ms). On a 600 KB JPEG, against a thread running Python all the time,
    decoding took 106 ms in 64 KiB pieces and 27 ms in one, for the same 15 ms of CPU and
    the same pixels.
    """
    if isinstance(img, ImageFile.ImageFile):
        img.decodermaxblock = max(ImageFile.MAXBLOCK, min(len(data), _DECODE_BLOCK))
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Formats whose frames may grow (GIF) check again while decoding.
        raise ImageTooLargeError(
            f"image rejected while decoding, as a possible decompression bomb: {exc} "
            f"({_describe(data, content_type)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(
            f"not a decodable image: {_reason(exc, img.format)} ({_describe(data, content_type)})"
        ) from exc


def _reason(exc: Exception, format: str | None = None) -> str:
    """Pillow's reason, said as an operator needs it."""
    if isinstance(exc, NotImplementedError):
        return f"Pillow cannot decode this variant of {format or 'its format'} ({exc or 'not implemented'})"
    if not str(exc):
        return type(exc).__name__  # a bare KeyError() or ZeroDivisionError() says nothing else
    return str(exc)


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
