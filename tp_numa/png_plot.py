"""A small line plot written as a PNG with only zlib + struct (no matplotlib needed).

``line_plot(path, xs, ys, ...)`` draws axes, tick labels (digits from a 3x5 bitmap font)
and the polyline through (xs, ys); matplotlib is used instead when it is installed and
``prefer_matplotlib`` is set, because it labels the axes in words.
"""
from __future__ import annotations

import struct
import zlib

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column)
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
}


class Canvas:
    """RGB pixels, origin top-left."""

    def __init__(self, width: int, height: int, bg=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def set(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb, thick: int = 1) -> None:
        """Bresenham line, `thick` pixels wide (a square brush)."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        r = thick // 2
        while True:
            for ox in range(-r, thick - r):
                for oy in range(-r, thick - r):
                    self.set(x0 + ox, y0 + oy, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2) -> None:
        """Draws digits, '.' and '-' with the top-left corner at (x, y)."""
        for ch in s:
            for row, bits in enumerate(_FONT.get(ch, (0,) * 5)):
                for col in range(3):
                    if bits & (4 >> col):
                        for a in range(scale):
                            for b in range(scale):
                                self.set(x + col * scale + a, y + row * scale + b, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2f}"


def line_plot(path: str, xs: list[float], ys: list[float], *, xlabel: str = "", ylabel: str = "",
              title: str = "", width: int = 640, height: int = 400, prefer_matplotlib: bool = True) -> str:
    """Writes the plot to ``path``; returns 'matplotlib' or 'builtin' (which writer was used)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_plot needs equally many x and y values, at least one")
    if prefer_matplotlib:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            pass
        else:
            fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
            ax.plot(xs, ys, marker="o")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return "matplotlib"
    c = Canvas(width, height)
    left, right, top, bottom = 70, 20, 20, 40
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) * 1.1 or 1.0
    if x1 == x0:
        x1 = x0 + 1

    def px(x: float, y: float) -> tuple[int, int]:
        return (left + round((x - x0) / (x1 - x0) * (width - left - right)),
                height - bottom - round(y / y1 * (height - top - bottom)))

    grey, black, blue = (210, 210, 210), (0, 0, 0), (31, 119, 180)
    for k in range(5):  # horizontal grid lines with their values
        y = y1 * k / 4
        _, py = px(x0, y)
        c.line(left, py, width - right, py, grey)
        c.text(4, py - 5, _tick(y))
    for k in range(5):
        x = x0 + (x1 - x0) * k / 4
        pxx, _ = px(x, 0)
        c.line(pxx, height - bottom, pxx, height - bottom + 5, black)
        c.text(pxx - 10, height - bottom + 10, _tick(x))
    c.line(left, top, left, height - bottom, black)
    c.line(left, height - bottom, width - right, height - bottom, black)
    pts = [px(x, y) for x, y in zip(xs, ys)]
    for (a, b), (cc, d) in zip(pts, pts[1:]):
        c.line(a, b, cc, d, blue, thick=2)
    for a, b in pts:
        c.line(a - 2, b, a + 2, b, blue, thick=3)
    with open(path, "wb") as f:
        f.write(c.png())
    return "builtin"
