"""A corpus of broken, hostile and merely unusual images, made by the tests from real bytes.

Each :class:`Case` is what an origin could serve for one catalog row, and how the pipeline must
end it: ``ok``, or dead-lettered by ``stage`` with an error of class ``error`` whose message holds
``message``. Nothing is mocked: the bytes are real encodings (from :mod:`tests.images`), cut,
overwritten or forged the way broken uploads, interrupted transfers and attackers produce them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from tests import images

__all__ = ["Case", "broken_image_cases"]


@dataclass(frozen=True)
class Case:
    """One image as served, and its documented fate.

    Attributes:
        name: Names the case (and its URL path).
        body: The bytes served.
        content_type: The ``Content-Type`` served.
        stage: ``None`` when the row must end ok; else the stage that dead-letters it.
        error: The exception's class name.
        message: A phrase of the dead letter's message.
    """

    name: str
    body: bytes
    content_type: str = "image/jpeg"
    stage: str | None = None
    error: str = ""
    message: str = ""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and carries almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def _gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame declare ``width`` x ``height``."""
    real = images.animated_gif(8, 8)
    screen = real[:6] + struct.pack("<HH", width, height) + real[10:]
    descriptor = screen.index(b"\x2c")  # the first image descriptor
    return screen[: descriptor + 5] + struct.pack("<HH", width, height) + screen[descriptor + 9 :]


def broken_image_cases() -> list[Case]:
    """Return the corpus: every case once, with distinct names."""
    jpeg = images.photo_jpeg(96, 72, seed=3)
    png = images.rgba_png(64, 48)
    gif = images.animated_gif(48, 32)
    webp = images.rgba_webp(64, 48)
    decode = ("thumbnail", "ImageDecodeError")
    too_large = ("thumbnail", "ImageTooLargeError")
    cases = [
        # Fine, if unusual: each must give thumbnails.
        Case("plain.jpg", jpeg),
        Case("cmyk.jpg", images.cmyk_jpeg(64, 48)),
        Case("gray16.png", images.i16_png(64, 48), "image/png"),
        Case("animated.gif", gif, "image/gif"),
        Case("animated.webp", images.animated_webp(48, 32), "image/webp"),
        Case("animated.png", images.animated_png(48, 32), "image/png"),
        Case("palette.png", images.palette_png_with_transparency(64, 48), "image/png"),
        Case("la.png", images.la_png(64, 48), "image/png"),
        Case("bilevel.png", images.bilevel_png(64, 48), "image/png"),
        Case("int32.tiff", images.int32_tiff(64, 48), "image/tiff"),
        Case("float.tiff", images.float_tiff(64, 48), "image/tiff"),
        # A wrong content type on good bytes: the bytes decide, not the header.
        Case("jpeg-as-octets.bin", jpeg, "application/octet-stream"),
        Case("png-as-jpeg.jpg", png, "image/jpeg"),
        # Not an image at all.
        Case(
            "empty.jpg", images.empty_bytes(), stage=decode[0], error=decode[1], message="the body is empty"
        ),
        Case("page.jpg", images.html_page(), "text/html", *decode, "cannot identify image file"),
        Case("garbage.jpg", images.garbage_bytes(2048), "image/jpeg", *decode, "cannot identify image file"),
        Case("text.png", b"hello, world\n" * 10, "image/png", *decode, "cannot identify image file"),
        # Real images in formats outside the allow-list: refused before their decoders run
        # (EPS would run Ghostscript; this DDS variant makes Pillow raise NotImplementedError).
        Case("vector.eps", images.eps(), "application/postscript", *decode, "identify it as EPS"),
        Case("texture.dds", images.dds_unimplemented("dxgi"), "image/vnd-ms.dds", *decode, "as DDS"),
        # Corrupt headers: the magic bytes wrong, or the header's fields nonsense.
        Case("bad-magic.jpg", b"\x00\x00" + jpeg[2:], "image/jpeg", *decode, "cannot identify image file"),
        Case("bad-magic.png", b"\x89PNX" + png[4:], "image/png", *decode, "cannot identify image file"),
        Case("zero-size.png", _png_header_only(0, 0), "image/png", *decode, "not a decodable image"),
        Case(
            "bad-ihdr-crc.png",
            png[:29] + b"\x00\x00\x00\x00" + png[33:],
            "image/png",
            *decode,
            "not a decodable image",
        ),
        # Bombs and huge declared dimensions: refused before any pixel is decoded.
        Case("bomb.png", images.png_bomb(8000, 8000), "image/png", *too_large, "over max_pixels"),
        Case(
            "huge-header.png",
            _png_header_only(100_000, 100_000),
            "image/png",
            *too_large,
            "possible decompression bomb",
        ),
        Case(
            "huge.gif", _gif_declaring(65_535, 65_535), "image/gif", *too_large, "possible decompression bomb"
        ),
    ]
    # Truncated at several offsets, as interrupted uploads leave them. An animated GIF cut after
    # its first frame still gives that frame, which is all a thumbnail shows: it ends ok.
    first_frame_end = gif.index(b"\x21\xf9", gif.index(b"\x2c")) if gif.count(b"\x21\xf9") > 1 else len(gif)
    for fmt, data, ctype in (
        ("jpg", jpeg, "image/jpeg"),
        ("png", png, "image/png"),
        ("gif", gif, "image/gif"),
        ("webp", webp, "image/webp"),
    ):
        for cut in (0.02, 0.3, 0.7, 0.97):
            keep = max(1, int(len(data) * cut))
            name = f"cut-{int(cut * 100)}.{fmt}"
            if fmt == "gif" and keep >= first_frame_end:
                cases.append(Case(name, data[:keep], ctype))
            else:
                cases.append(Case(name, data[:keep], ctype, *decode, "not a decodable image"))
    return cases
