"""A PNG of the training curves (loss and validation metrics per epoch), drawn with PIL only."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_W, _H, _PAD = 460, 320, 44


def _panel(
    draw: ImageDraw.ImageDraw, x0: int, title: str, series: dict[str, list[tuple[float, float]]]
) -> None:
    left, top, right, bottom = x0 + _PAD, _PAD, x0 + _W - 12, _H - _PAD
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 12), title, fill=(0, 0, 0))
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6
    draw.text((x0 + 4, top - 6), f"{ymax:.3g}", fill=(0, 0, 0))
    draw.text((x0 + 4, bottom - 6), f"{ymin:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"epoch {xmin:g}", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 6), f"epoch {xmax:g}", fill=(0, 0, 0))

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - xmin) / (xmax - xmin) * (right - left),
            bottom - (y - ymin) / (ymax - ymin) * (bottom - top),
        )

    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        px = [to_px(x, y) for x, y in pts]
        if len(px) > 1:
            draw.line(px, fill=colour, width=2)
        for cx, cy in px:
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((left + 8, top + 6 + 14 * i), name, fill=colour)


def plot_history(history: Sequence[dict], metrics: Sequence[str] | None = None) -> bytes:
    """PNG bytes: training loss per epoch (left) and the ``val_*`` metrics per epoch (right)."""
    loss = {"train_loss": [(h["epoch"], h["train_loss"]) for h in history if h.get("train_loss") is not None]}
    names = metrics or sorted(
        {k for h in history for k, v in h.items() if k.startswith("val_") and isinstance(v, float)}
    )
    vals = {n: [(h["epoch"], h[n]) for h in history if isinstance(h.get(n), (int, float))] for n in names}
    image = Image.new("RGB", (2 * _W, _H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _panel(draw, 0, "training loss", loss)
    _panel(draw, _W, "validation metrics", {k: v for k, v in vals.items() if v})
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
