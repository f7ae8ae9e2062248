"""Look inside one prediction: `potion explain` and `potion.explain(...)`.

compute.py runs the traced forward pass and gathers the numbers into one frozen Explanation (schema.py, with its
JSON and probe files); text.py, html.py (+ page.html) and plot.py only read it. matplotlib is imported only when
a PNG is saved.
"""

from potion.explain.compute import check_probe, explain, save_probe
from potion.explain.html import render_html, save_html
from potion.explain.plot import save_png
from potion.explain.schema import Explanation, load_json, load_probes, probe_path, save_json, visible
from potion.explain.text import render_text, use_color

__all__ = [
    "Explanation",
    "check_probe",
    "explain",
    "load_json",
    "load_probes",
    "probe_path",
    "render_html",
    "render_text",
    "save_html",
    "save_json",
    "save_png",
    "save_probe",
    "use_color",
    "visible",
]
