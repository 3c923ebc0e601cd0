"""Real image bytes for tests and benchmarks, made with Pillow.

Every function returns the encoded bytes of a file as a camera, a browser or an attacker
would hand it to the pipeline; nothing here is a mock. Images are deterministic: the same
arguments give the same pixels (random noise comes from a seeded :class:`random.Random`).

The photo-like images are a smooth colour field plus fine noise, so they compress roughly like
a photograph (a flat colour would encode unrealistically fast and small).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Any

from PIL import Image, ImageCms

__all__ = [
    "EXIF_ORIENTATION",
    "XMP_PACKET",
    "animated_gif",
    "animated_png",
    "animated_webp",
    "bilevel_png",
    "cmyk_jpeg",
    "dds_unimplemented",
    "empty_bytes",
    "encode",
    "eps",
    "float_tiff",
    "garbage_bytes",
    "grayscale_jpeg",
    "html_page",
    "i16_png",
    "int32_tiff",
    "la_png",
    "palette_png_with_transparency",
    "photo_image",
    "photo_jpeg",
    "png_bomb",
    "ppm",
    "rgba_png",
    "rgba_webp",
    "truncated_jpeg",
]

EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how the camera was held."""

XMP_PACKET = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="test-camera"/>'
    b'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)
"""A small XMP packet, to check that thumbnails do not carry it."""

# The colours of the frames of the animated images: a thumbnail must show the first one.
FRAME_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def photo_image(width: int = 1600, height: int = 1200, *, seed: int = 0) -> Image.Image:
    """Return an RGB image that compresses like a photograph.

    Args:
        width: Width in pixels.
        height: Height in pixels.
        seed: Seeds the noise; the same seed gives the same pixels.
    """
    rng = random.Random(seed)
    # A coarse random grid upscaled with bicubic gives smooth colour regions, like a scene...
    coarse_size = (max(2, width // 64), max(2, height // 64))
    coarse = Image.frombytes("RGB", coarse_size, rng.randbytes(coarse_size[0] * coarse_size[1] * 3))
    smooth = coarse.resize((width, height), Image.Resampling.BICUBIC)
    # ... and a little fine noise stands in for texture and sensor noise.
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    return Image.blend(smooth, noise, 0.12)


def encode(img: Image.Image, format: str, **params: Any) -> bytes:
    """Encode ``img`` in ``format`` (a Pillow format name) with Pillow's save ``params``."""
    buf = io.BytesIO()
    img.save(buf, format=format, **params)
    return buf.getvalue()


def photo_jpeg(
    width: int = 1600,
    height: int = 1200,
    *,
    seed: int = 0,
    quality: int = 90,
    orientation: int | None = None,
    xmp: bool = False,
    icc: bool = False,
) -> bytes:
    """Return a photo-like baseline JPEG.

    Args:
        width: Stored width in pixels (before any EXIF orientation).
        height: Stored height in pixels.
        seed: Seeds the noise.
        quality: JPEG quality.
        orientation: If given, an EXIF Orientation tag (6 means "rotate 90 degrees clockwise
            to display", so the displayed image is ``height`` x ``width``).
        xmp: Also embed :data:`XMP_PACKET`.
        icc: Also embed an sRGB ICC profile.
    """
    params: dict[str, Any] = {"quality": quality}
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make: so every such JPEG carries some EXIF to strip
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    params["exif"] = exif.tobytes()
    if xmp:
        params["xmp"] = XMP_PACKET
    if icc:
        params["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(photo_image(width, height, seed=seed), "JPEG", **params)


def grayscale_jpeg(width: int = 800, height: int = 600) -> bytes:
    """Return a photo-like mode ``L`` JPEG."""
    return encode(photo_image(width, height).convert("L"), "JPEG", quality=90)


def cmyk_jpeg(width: int = 800, height: int = 600) -> bytes:
    """Return a photo-like CMYK JPEG (as print workflows produce)."""
    return encode(photo_image(width, height).convert("CMYK"), "JPEG", quality=90)


def _with_alpha(width: int, height: int) -> Image.Image:
    """A photo with an alpha channel: fully transparent on the left, opaque on the right."""
    img = photo_image(width, height).convert("RGBA")
    alpha = Image.linear_gradient("L").rotate(90).resize((width, height))
    img.putalpha(alpha)
    return img


def rgba_png(width: int = 800, height: int = 600) -> bytes:
    """Return an RGBA PNG whose alpha rises from transparent (left) to opaque (right)."""
    return encode(_with_alpha(width, height), "PNG")


def rgba_webp(width: int = 800, height: int = 600) -> bytes:
    """Return an RGBA WebP whose alpha rises from transparent (left) to opaque (right)."""
    return encode(_with_alpha(width, height), "WEBP", quality=85)


def palette_png_with_transparency(width: int = 640, height: int = 480) -> bytes:
    """Return a mode ``P`` PNG whose left half is the transparent palette index (a ``tRNS`` chunk)."""
    img = photo_image(width, height).quantize(colors=64)
    # Index 0 becomes the transparent one; paint the left half with it.
    img.paste(0, (0, 0, width // 2, height))
    return encode(img, "PNG", transparency=0)


def la_png(width: int = 640, height: int = 480) -> bytes:
    """Return a grey-plus-alpha (``LA``) PNG."""
    return encode(_with_alpha(width, height).convert("LA"), "PNG")


def bilevel_png(width: int = 640, height: int = 480) -> bytes:
    """Return a 1-bit (mode ``1``) PNG, dithered from a photo."""
    return encode(photo_image(width, height).convert("1"), "PNG")


def _gradient16(width: int, height: int) -> bytes:
    """Little-endian 16-bit samples: a horizontal ramp over the full 0..65535 range."""
    row = b"".join(struct.pack("<H", x * 65535 // max(1, width - 1)) for x in range(width))
    return row * height


def i16_png(width: int = 640, height: int = 480) -> bytes:
    """Return a 16-bit greyscale PNG (Pillow opens it as ``I;16``)."""
    return encode(Image.frombytes("I;16", (width, height), _gradient16(width, height)), "PNG")


def int32_tiff(width: int = 640, height: int = 480) -> bytes:
    """Return a 32-bit signed integer (mode ``I``) TIFF with a 0..65535 ramp."""
    img = Image.frombytes("I;16", (width, height), _gradient16(width, height)).convert("I")
    return encode(img, "TIFF")


def float_tiff(width: int = 640, height: int = 480) -> bytes:
    """Return a 32-bit float (mode ``F``) TIFF with a 0.0..1.0 ramp, as scientific images use."""
    ramp = Image.linear_gradient("L").rotate(90).resize((width, height)).convert("F")
    return encode(ramp.point(lambda v: v / 255.0), "TIFF")


def _frames(width: int, height: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, height), colour) for colour in FRAME_COLOURS]


def animated_gif(width: int = 320, height: int = 240) -> bytes:
    """Return a three-frame GIF: red, then green, then blue."""
    first, *rest = _frames(width, height)
    return encode(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def animated_webp(width: int = 320, height: int = 240) -> bytes:
    """Return a three-frame animated WebP: red, then green, then blue."""
    first, *rest = _frames(width, height)
    return encode(first, "WEBP", save_all=True, append_images=rest, duration=100, lossless=True)


def animated_png(width: int = 320, height: int = 240) -> bytes:
    """Return a three-frame APNG: red, then green, then blue."""
    first, *rest = _frames(width, height)
    return encode(first, "PNG", save_all=True, append_images=rest, duration=100)


def truncated_jpeg(keep: float = 0.5) -> bytes:
    """Return a photo-like JPEG cut off after ``keep`` of its bytes (as an interrupted download)."""
    data = photo_jpeg(800, 600)
    return data[: int(len(data) * keep)]


def garbage_bytes(size: int = 4096, *, seed: int = 1) -> bytes:
    """Return random bytes that are no image format."""
    return random.Random(seed).randbytes(size)


def empty_bytes() -> bytes:
    """Return zero bytes, as a server answering 200 with an empty body does."""
    return b""


def html_page() -> bytes:
    """Return an HTML error page, as a CDN serves in place of an image."""
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>\n"
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """Return a valid 1-bit PNG of ``width`` x ``height`` zeros: about 100 KB that decodes huge.

    Pillow keeps mode ``1`` at one byte per pixel, so decoding the default would allocate
    900 MB. The IDAT stream is compressed row by row, so making it needs little memory.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "none", then the packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def eps(width: int = 64, height: int = 48) -> bytes:
    """Return an Encapsulated PostScript file, as Pillow writes it (no Ghostscript needed).

    Decoding it would run Ghostscript, a PostScript interpreter: the attack surface an allow-list
    of source formats keeps out.
    """
    return encode(photo_image(width, height), "EPS")


def ppm(width: int = 64, height: int = 48) -> bytes:
    """Return a binary PPM (``P6``): a real image in a format outside the default allow-list."""
    return encode(photo_image(width, height), "PPM")


# DDS pixel-format flags (DDPF_*) and the header fields Pillow reads.
_DDS_HEADER_FLAGS = 0x1007  # CAPS | HEIGHT | WIDTH | PIXELFORMAT
_DDPF_FOURCC = 0x4


def dds_unimplemented(kind: str) -> bytes:
    """Return an 8x8 DirectDraw Surface whose pixel format Pillow has no decoder for.

    Pillow raises ``NotImplementedError`` while identifying these (its own test images
    ``unimplemented_pfflags.dds``, ``unimplemented_pixel_format.dds`` and
    ``unimplemented_dxgi_format.dds`` do the same); built by hand to the DDS layout.

    Args:
        kind: ``"pfflags"`` (no known pixel-format flag), ``"fourcc"`` (an unknown FourCC code)
            or ``"dxgi"`` (a DX10 header naming an unknown DXGI format).
    """
    pfflags, fourcc, dxgi = {
        "pfflags": (0, b"\0\0\0\0", None),
        "fourcc": (_DDPF_FOURCC, b"ABCD", None),
        "dxgi": (_DDPF_FOURCC, b"DX10", 999),
    }[kind]
    header = struct.pack("<6I", _DDS_HEADER_FLAGS, 8, 8, 0, 0, 0) + bytes(44)  # + 11 reserved
    header += struct.pack("<2I4sI", 32, pfflags, fourcc, 0) + bytes(16)  # pixel format: no masks
    header += bytes(20)  # caps and a reserved word
    body = b"DDS " + struct.pack("<I", 4 + len(header)) + header
    if dxgi is not None:
        body += struct.pack("<5I", dxgi, 3, 0, 1, 0)  # format, 2D texture, flags, array size, flags
    return body + bytes(8 * 8 * 4)
