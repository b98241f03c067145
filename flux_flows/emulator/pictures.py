"""The pictures the emulator answers with: deterministic placeholders drawn from (prompt, seed,
size), Kontext edits drawn over their input image, blank filtered images, JPEGs padded to a target
size for benchmarks, and the broken payloads of the delivery faults. Rendering is the only
CPU-heavy work of a request, so these functions are run in worker threads.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import random
import textwrap
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from flux_flows.emulator.config import DEFAULT_JPEG_QUALITY, Mode
from flux_flows.emulator.parsing import ParsedRequest
from flux_flows.models import ASPECT_RATIO_SIZES

if TYPE_CHECKING:  # only an annotation: state imports nothing from here, so no cycle at runtime
    from flux_flows.emulator.state import KontextTask


_fonts = threading.local()
_NOISE_STRIPE = 16  # rows; one JPEG MCU at 4:2:0, so noisy stripes never share blocks with text
_PROMPT_CHARS_DRAWN = 200


def _seeded(*parts: Any) -> random.Random:
    """A generator seeded from a stable hash: same parts, same numbers, in every process."""
    payload = json.dumps(parts, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return random.Random(int.from_bytes(hashlib.sha256(payload).digest()[:16], "big"))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """One font object per thread: FreeType faces must not be shared by concurrent renders."""
    cache: dict[int, Any] = _fonts.__dict__.setdefault("by_size", {})
    if size not in cache:
        try:
            cache[size] = ImageFont.load_default(size=size)
        except (ImportError, OSError):  # Pillow without FreeType: small bitmap font
            cache[size] = ImageFont.load_default()
    return cache[size]


def _vivid(rng: random.Random, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), 0.45 + 0.5 * rng.random(), value)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class _Layout:
    margin: int
    font_size: int
    caption_bottom: int
    label_top: int


def _layout(width: int, height: int, lines: int) -> _Layout:
    font_size = max(12, round(min(width, height) / 28))
    margin = max(8, font_size // 2)
    line_height = round(font_size * 1.25)
    caption_bottom = margin + 2 * margin + lines * line_height
    label_top = height - margin - line_height - 2 * margin
    return _Layout(margin, font_size, caption_bottom, label_top)


def _caption_lines(prompt: str, width: int, font_size: int) -> list[str]:
    text = "".join(ch if ch.isprintable() else " " for ch in prompt[:_PROMPT_CHARS_DRAWN])
    if len(prompt) > _PROMPT_CHARS_DRAWN:
        text += "..."
    per_line = max(8, int((width - 4 * font_size) / (font_size * 0.47)))
    return textwrap.wrap(text, per_line, max_lines=6, placeholder=" ...") or [""]


def _paint_background(image: Image.Image, rng: random.Random) -> None:
    """Bands of solid colour: a gradient at the cost of a few memsets (a real resize is ~6 ms)."""
    width, height = image.size
    start, end = _vivid(rng, 0.95), _vivid(rng, 0.35)
    vertical = rng.random() < 0.5
    span = height if vertical else width
    bands = 48
    for i in range(bands):
        f = i / (bands - 1)
        colour = tuple(round(a + (b - a) * f) for a, b in zip(start, end, strict=True))
        lo, hi = i * span // bands, (i + 1) * span // bands
        box = (0, lo, width, hi) if vertical else (lo, 0, hi, height)
        image.paste(colour, box)


def _paint_shapes(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    scale = min(width, height)
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(scale // 12, scale // 4)
        colour = _vivid(rng, 0.6 + 0.4 * rng.random())
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == 1:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


def _paint_text(
    draw: ImageDraw.ImageDraw, lines: list[str], label: str, box: _Layout, width: int
) -> None:
    font = _font(box.font_size)
    m = box.margin
    draw.rectangle((m, m, width - m, box.caption_bottom), fill=(12, 12, 16))
    draw.multiline_text((2 * m, 2 * m), "\n".join(lines), font=font, fill=(245, 245, 245))
    label_width = int(draw.textlength(label, font=font)) + 4 * m
    draw.rectangle(
        (m, box.label_top, m + label_width, box.label_top + 2 * m + box.font_size * 1.25),
        fill=(12, 12, 16),
    )
    draw.text((3 * m, box.label_top + m), label, font=font, fill=(245, 245, 245))


def draw_picture(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """The placeholder picture for (prompt, seed, size): identical pixels for identical inputs.

    Seeded colours and shapes make two seeds of one prompt obviously different to a person; the
    prompt and seed are written on it so a contact sheet can be checked by eye.
    """
    return _render(prompt, seed, width, height)[0]


def _render(
    prompt: str, seed: int, width: int, height: int, salt: tuple[Any, ...] = ()
) -> tuple[Image.Image, _Layout]:
    rng = _seeded("flux-flows-emulator", prompt, seed, width, height, *salt)
    image = Image.new("RGB", (width, height))
    _paint_background(image, rng)
    draw = ImageDraw.Draw(image)
    _paint_shapes(draw, rng, width, height)
    lines = _caption_lines(prompt, width, _layout(width, height, 1).font_size)
    layout = _layout(width, height, len(lines))
    _paint_text(draw, lines, f"seed {seed}  {width}x{height}", layout, width)
    return image, layout


def _encode(image: Image.Image, mode: Mode, quality: int) -> bytes:
    """PNG at compress level 1: the JSON answer must stay cheap, and size barely matters here."""
    out = io.BytesIO()
    if mode == "jpeg":
        image.save(out, "JPEG", quality=quality)
    else:
        image.save(out, "PNG", compress_level=1)
    return out.getvalue()


@lru_cache(maxsize=64)
def _blank(width: int, height: int, mode: Mode, quality: int) -> bytes:
    """What a filtered generation returns: all black, so it cannot pass for a real image."""
    return _encode(Image.new("RGB", (width, height)), mode, quality)


def _noise_stripe(width: int, seed_parts: tuple[Any, ...]) -> Image.Image:
    data = _seeded("noise", *seed_parts).randbytes(width * _NOISE_STRIPE * 3)
    return Image.frombytes("RGB", (width, _NOISE_STRIPE), data)


@lru_cache(maxsize=64)
def _bytes_per_noisy_stripe(width: int, quality: int) -> float:
    """Cost of one noisy stripe, measured once on a fixed reference so sizes stay deterministic."""
    rows = 8
    height = rows * _NOISE_STRIPE
    plain = Image.new("RGB", (width, height), (128, 128, 128))
    noisy = plain.copy()
    _add_noise(noisy, list(range(rows)), 0, _noise_stripe(width, ("calibration", width)))
    extra = len(_encode(noisy, "jpeg", quality)) - len(_encode(plain, "jpeg", quality))
    return max(extra / rows, 1.0)


def _add_noise(image: Image.Image, stripes: list[int], top: int, noise: Image.Image) -> None:
    for index in stripes:
        box = (0, top + index * _NOISE_STRIPE, image.width, top + (index + 1) * _NOISE_STRIPE)
        image.paste(Image.blend(image.crop(box), noise, 0.5), box)


def _spread(count: int, available: int) -> list[int]:
    """`count` stripe indices spaced evenly, so the texture covers the picture, not one band."""
    count = max(0, min(count, available))
    return sorted({i * available // count for i in range(count)}) if count else []


def _jpeg_of_size(
    image: Image.Image, quality: int, target: int, layout: _Layout, seed_parts: tuple[Any, ...]
) -> bytes:
    """A JPEG of about `target` bytes (benchmarks need realistic transfer sizes, ~100-400 KB).

    Seeded noise stripes are blended in between the caption and the label; JPEG size grows about
    linearly with the number of noisy stripes, so one correction step lands within +-25%.
    """
    plain = _encode(image, "jpeg", quality)
    if len(plain) >= target * 0.75:
        return plain
    top = -(-layout.caption_bottom // _NOISE_STRIPE) * _NOISE_STRIPE + _NOISE_STRIPE
    available = max(0, (layout.label_top - top) // _NOISE_STRIPE)
    per_stripe = _bytes_per_noisy_stripe(image.width, quality)
    noise = _noise_stripe(image.width, seed_parts)
    count = math.ceil((target - len(plain)) / per_stripe)
    result = plain
    for _ in range(2):
        noisy = image.copy()
        _add_noise(noisy, _spread(count, available), top, noise)
        result = _encode(noisy, "jpeg", quality)
        if abs(len(result) - target) <= target * 0.2 or count >= available:
            break
        observed = max((len(result) - len(plain)) / max(count, 1), 1.0)
        count = math.ceil((target - len(plain)) / observed)
    return result


def image_bytes(
    gen: ParsedRequest, seed: int, mode: Mode, quality: int, filtered: bool, image_kb: int | None
) -> bytes:
    """Runs in a worker thread: rendering and encoding are the only CPU-heavy part of a request."""
    width, height = ASPECT_RATIO_SIZES[gen.aspect_ratio]
    file_mode: Mode = "png" if mode == "json" else mode
    if filtered:
        return _blank(width, height, file_mode, quality)
    image, layout = _render(gen.prompt, seed, width, height)
    if file_mode == "jpeg" and image_kb:
        seed_parts = (gen.prompt, seed, width, height)
        return _jpeg_of_size(image, quality, image_kb * 1024, layout, seed_parts)
    return _encode(image, file_mode, quality)


def _render_edit(source: bytes, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """An edit that visibly comes from its input: the input fitted to the size, a per-seed tint
    and the prompt drawn on it, so a contact sheet shows which photo each result was made from."""
    with Image.open(io.BytesIO(source)) as opened:
        base = ImageOps.fit(opened.convert("RGB"), (width, height), Image.Resampling.BILINEAR)
    rng = _seeded("flux-flows-emulator-edit", prompt, seed, width, height)
    image = Image.blend(base, Image.new("RGB", (width, height), _vivid(rng, 0.9)), 0.25)
    lines = _caption_lines(prompt, width, _layout(width, height, 1).font_size)
    layout = _layout(width, height, len(lines))
    _paint_text(ImageDraw.Draw(image), lines, f"edit  seed {seed}  {width}x{height}", layout, width)
    return image


def kontext_image_bytes(task: KontextTask) -> bytes:
    """Runs in a worker thread. Depends only on (prompt, seed, size, input image hash)."""
    job = task.job
    width, height = ASPECT_RATIO_SIZES[job.aspect_ratio]
    if task.input_bytes is not None:
        image = _render_edit(task.input_bytes, job.prompt, task.seed, width, height)
    else:
        salt = (job.input_hash,) if job.input_hash else ()
        image = _render(job.prompt, task.seed, width, height, salt)[0]
    return _encode(image, job.output_format, DEFAULT_JPEG_QUALITY)


def garbage_bytes(size: int = 4096) -> bytes:
    """Bytes no image decoder accepts (no JPEG/PNG magic), yet looking like a plausible payload."""
    return b"NOT-AN-IMAGE\n" + _seeded("garbage").randbytes(size)


HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    "<h1>502 Bad Gateway</h1><p>The upstream server did not answer in time.</p>"
    "<hr><address>edge-proxy</address></body></html>"
)
