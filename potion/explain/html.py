"""The HTML view of an Explanation: one self-contained page that works offline.

The page is potion/explain/page.html with the data inlined as JSON; its script and style are inline too, and it
loads nothing (no fonts, no scripts, no images from anywhere), so it can be mailed or opened from a USB stick.
Probes saved during training (potion train --probe) become a step slider.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from potion.errors import PotionError
from potion.formats.fileio import atomic_write_text

MAX_PROBES = 120  # steps kept for the slider; more are thinned evenly (the first and last are always kept)


def probe_summary(p) -> dict:
    """What the slider needs from one training step (p: a probe's Explanation): the focus token's attention and
    the prediction."""
    return {
        "step": p.step,
        "prompt": p.prompt,
        "tokens": [t.label for t in p.tokens],
        "focus": p.focus,
        "heads": [h.weights for h in p.heads],
        "prediction": [{"label": c.label, "probability": c.probability} for c in p.prediction],
        "target": {"label": p.target.label, "probability": p.target.probability},
    }


def thin(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def render_html(e, probes: list = ()) -> str:
    """The explain page of e (an Explanation), with a slider over the probes saved during training."""
    steps = [probe_summary(p) for p in thin(list(probes), MAX_PROBES)]
    return render_page({"explanation": e.to_dict(), "probes": steps}, f"potion explain: {e.prompt[:60]}")


def render_page(data: dict, title: str, controls: str = "", script: str = "") -> str:
    """page.html with data inlined; `potion serve` adds its live controls and script to the same page."""
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    data_json = strict_json(data).replace("<", "\\u003c").replace(">", "\\u003e")  # nothing can close the tag
    title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    fill = {"__TITLE__": title, "__DATA__": data_json, "__LIVE_CONTROLS__": controls, "__LIVE_SCRIPT__": script}
    markers = "|".join(fill)
    return re.sub(markers, lambda m: fill[m.group(0)], page)  # one pass: a prompt may hold a marker


def repr_html(e) -> str:
    """The page inside an iframe, for a notebook cell: its script and style stay apart from the notebook's."""
    page = render_html(e).replace("&", "&amp;").replace('"', "&quot;")
    style = "width: 100%; height: 720px; border: 1px solid #ddd"
    return f'<iframe srcdoc="{page}" style="{style}" title="potion explain"></iframe>'


def save_html(e, path: str | Path, probes: list = ()) -> None:
    atomic_write_text(Path(path), render_html(e, probes))


def strict_json(body, indent: int | None = None) -> str:
    """JSON a browser parses: NaN and infinity, which JSON lacks, are one PotionError rather than invalid output."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=indent)
    except ValueError:
        raise PotionError(
            "this explanation holds numbers that are not finite (NaN or inf): the model's weights are damaged or "
            "too large"
        ) from None
