"""The terminal view of an Explanation: an attention heatmap that fits the terminal, then the numbers.

With colour (a terminal, NO_COLOR unset) heat is a background colour; without it, shade characters carry the
same picture, so the output also reads in a log file or a pipe.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
import unicodedata

from potion.explain.schema import Explanation, HeadAttention

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SHADES = " ░▒▓█"  # plain heat: < 5 %, < 25 %, < 50 %, < 75 %, the rest
HEAT = [17, 18, 19, 25, 31, 37, 72, 107, 142, 178, 220]  # 256-colour ramp, dark blue -> yellow, reads on both themes
MAX_LABEL = 10  # longest token label shown in a heatmap column
HEAD_ROWS_LIMIT = 32  # beyond this many heads, the heatmap shows layer averages plus the chosen layer's heads
LIST_LIMIT = 8  # rows in the occlusion and logit-attribution lists


def use_color(stream) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org) or TERM is dumb."""
    return (
        hasattr(stream, "isatty")
        and stream.isatty()
        and "NO_COLOR" not in os.environ
        and os.environ.get("TERM") != "dumb"
    )


def terminal_width(default: int = 100) -> int:
    return max(40, shutil.get_terminal_size((default, 24)).columns)


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)


def clip(text: str, width: int) -> str:
    if display_width(text) <= width:
        return text
    out = ""
    for c in text:
        if display_width(out + c + "…") > width:
            break
        out += c
    return out + "…"


def quoted(label: str) -> str:
    return f"'{label}'"


class Style:
    def __init__(self, color: bool):
        self.color = color

    def bold(self, text: str) -> str:
        return f"\x1b[1m{text}\x1b[0m" if self.color else text

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def heat(self, weight: float, width: int) -> str:
        """One heatmap cell: a tens digit on a coloured background, or a shade character without colour."""
        if not self.color:
            level = sum(weight >= t for t in (0.05, 0.25, 0.5, 0.75))
            return SHADES[level] * width
        colour = HEAT[min(len(HEAT) - 1, int(weight * len(HEAT)))]
        foreground = 16 if colour in (142, 178, 220, 107) else 231  # dark text on the bright end
        digit = " " if weight < 0.05 else "█" if weight >= 0.995 else str(int(weight * 10))
        return f"\x1b[48;5;{colour}m\x1b[38;5;{foreground}m{digit.center(width)}\x1b[0m"


def render_text(e: Explanation, width: int | None = None, color: bool = False) -> str:
    width = width or terminal_width()
    style = Style(color)
    sections = [
        header(e, style, width),
        prediction(e, style),
        heatmap(e, style, width),
        head_detail(e, style),
        worked_example(e, style),
        logit_lens(e, style, width),
        what_mattered(e, style),
        checks(e, style),
    ]
    sections.append(style.dim(e.notes[0]))
    text = "\n\n".join(s for s in sections if s)
    return "\n".join(fit(line, width) for line in text.split("\n")) + "\n"


def fit(line: str, width: int) -> str:
    """Wrap a line of prose that is wider than the terminal (its bold or dim styling is dropped when it wraps)."""
    if display_width(ANSI.sub("", line)) <= width:
        return line
    plain = ANSI.sub("", line)
    indent = " " * (len(plain) - len(plain.lstrip()) + 2)
    return textwrap.fill(plain, width, subsequent_indent=indent, break_on_hyphens=False)


def header(e: Explanation, style: Style, width: int) -> str:
    m = e.model
    focus = e.tokens[e.focus]
    lines = [
        style.bold(
            f"potion explain: {m.n_layer} layers × {m.heads_text} (head size {m.head_dim}), "
            f"{m.tokenizer} tokens, a prompt of {len(e.tokens)} tokens"
        )
        + (f", training step {e.step}" if e.step is not None else "")
    ]
    line = "tokens: "
    for t in e.tokens:
        cell = f"{t.index}:{t.label}" if t.index != e.focus else f"[{t.index}:{t.label}]"
        if display_width(line) + display_width(cell) + 1 > width:
            lines.append(line.rstrip())
            line = "        "
        line += cell + " "
    lines.append(line.rstrip())
    which = "the last" if e.focus == len(e.tokens) - 1 else "choose with --token"
    lines.append(f"focus: token {e.focus} {quoted(focus.label)} ({which}); · is a space, ↵ a newline")
    return "\n".join(lines)


def bar(fraction: float, cells: int = 20) -> str:
    eighths = round(max(0.0, min(1.0, fraction)) * cells * 8)
    return "█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths % 8 else "")


def prediction(e: Explanation, style: Style) -> str:
    lines = [
        style.bold(f"Next token after token {e.focus} {quoted(e.tokens[e.focus].label)}")
        + "  (final linear layer + softmax over the vocabulary)"
    ]
    for c in e.prediction:
        lines.append(f"  {c.rank:>3}. {clip(quoted(c.label), 14):<14} {c.probability:7.3f}  {bar(c.probability)}")
    if e.expected:
        x = e.expected
        more = f" (the first of its {x.tokens_in_text} tokens)" if x.tokens_in_text > 1 else ""
        lines.append(
            f"  expected {quoted(x.candidate.label)}{more}: rank {x.candidate.rank}, "
            f"probability {x.candidate.probability:.4f}"
        )
    return "\n".join(lines)


def heatmap_rows(e: Explanation) -> list[tuple[str, list[float]]]:
    """(row label, weight per visible key) for each head and each layer's average, in reading order."""
    n_layer, n_head = e.model.n_layer, e.model.n_head
    rows = []
    for layer in range(n_layer):
        show_heads = n_layer * n_head <= HEAD_ROWS_LIMIT or layer == e.layer
        if show_heads:
            for head in range(n_head):
                rows.append((f"L{layer} H{head}", list(e.head_attention(layer, head).weights)))
        rows.append((f"L{layer} avg", list(e.head_averages[layer].weights)))
    return rows


def heatmap(e: Explanation, style: Style, width: int) -> str:
    label_width = 9
    columns = [clip(t.label, MAX_LABEL) for t in e.tokens]
    first, used = e.focus + 1, label_width + 2
    while first > 0 and used + display_width(columns[first - 1]) + 1 <= width:  # the window that ends at the focus
        first -= 1
        used += display_width(columns[first]) + 1
    last = e.focus  # then as many masked (later) tokens as still fit, so the mask is visible
    while last + 1 < len(columns) and used + display_width(columns[last + 1]) + 1 <= width:
        last += 1
        used += display_width(columns[last]) + 1
    shown = range(first, last + 1)
    widths = {i: max(1, display_width(columns[i])) for i in shown}
    lead = "…" if first > 0 else " "
    lines = [
        style.bold(f"Attention of token {e.focus} {quoted(e.tokens[e.focus].label)}")
        + ": the weight on each earlier token, per layer (L) and head (H)",
        " " * label_width
        + lead
        + " "
        + " ".join(columns[i] + " " * (widths[i] - display_width(columns[i])) for i in shown),
    ]
    for name, weights in heatmap_rows(e):
        cells = " ".join(
            style.heat(weights[i], widths[i]) if i <= e.focus else style.dim("×" * widths[i]) for i in shown
        )
        lines.append(f"{name:<{label_width}}{lead} {cells}")
    key = "digit = tenths of the weight" if style.color else f"shades {SHADES[1:]} = 5 %, 25 %, 50 %, 75 % and more"
    hidden = f"; tokens {first}..{last} of {len(columns)} fit the width" if first > 0 or last + 1 < len(columns) else ""
    masked = f"; × = masked: the {len(e.masked)} later tokens (a token never sees the future)" if e.masked else ""
    average = "'avg' rows are the mean of a layer's heads (a summary, not a model step)"
    lines.append(style.dim(f"{key}{hidden}{masked}; {average}"))
    return "\n".join(lines)


def head_detail(e: Explanation, style: Style) -> str:
    h: HeadAttention = e.head_attention(e.layer, e.head)
    lines = [
        style.bold(f"Layer {e.layer}, head {e.head}") + " (choose with --layer/--head): the query of token "
        f"{e.focus} (what it looks for) against each key (what a token offers)",
        f"  {'key token':<16}{'q·k':>9}{f'÷√{e.model.head_dim}':>9}{'weight':>9}{'|value|':>9}{'weight×|v|':>12}",
    ]
    for k in h.keys:
        lines.append(
            f"  {clip(f'{k.index} {quoted(k.label)}', 15):<16}{k.score:9.3f}{k.scaled_score:9.3f}"
            f"{k.weight:9.3f}{k.value_norm:9.3f}{k.weighted_value_norm:12.3f}"
        )
    if h.other_weight > 0:
        lines.append(f"  {'(the other keys)':<34}{h.other_weight:9.3f}")
    masked = f"tokens {e.masked[0]}..{e.masked[-1]} are masked (weight 0)" if e.masked else "no later tokens to mask"
    lines.append(f"  row sum {h.row_sum:.4f} (softmax weights always sum to 1); {masked}")
    lines.append(style.dim("  value = what a token passes on; the context vector is the weighted mix of the values"))
    return "\n".join(lines)


def worked_example(e: Explanation, style: Style) -> str:
    w = e.head_attention(e.layer, e.head).worked
    n = len(w.query_entries)
    more = w.head_dim - n

    def vector(entries):
        return "[" + ", ".join(f"{x:.3f}" for x in entries) + (", …" if more else "") + "]"

    terms = " + ".join(f"{q:.3f}×{k:.3f}" for q, k in zip(w.query_entries, w.key_entries))
    rest = f" + ({more} more terms: {w.rest_of_dot_product:.3f})" if more else ""
    exp_of = f"exp({w.scaled_score:.3f} − {w.shift:.3f})" if w.shift else f"exp({w.scaled_score:.3f})"
    lines = [
        style.bold(
            f"Worked example: query of token {w.query_index} · key of token {w.key_index} "
            f"(layer {e.layer}, head {e.head}, the most-attended pair)"
        ),
        f"  q = {vector(w.query_entries)}  ({w.head_dim} entries)",
        f"  k = {vector(w.key_entries)}",
        f"  q·k = {terms}{rest} = {w.dot_product:.4f}",
        f"  scaled = {w.dot_product:.4f} / √{w.head_dim} = {w.scaled_score:.4f}",
        (
            f"  {exp_of} = {w.exp_score:.4f}; the same summed over the {w.query_index + 1} visible keys = "
            f"{w.exp_sum:.4f}"
        ),
        f"  weight = {w.exp_score:.4f} / {w.exp_sum:.4f} = {w.weight:.4f}",
    ]
    if w.note:
        lines.append(style.dim(f"  ({w.note})"))
    return "\n".join(lines)


def logit_lens(e: Explanation, style: Style, width: int) -> str:
    target = quoted(e.target.label)
    lines = [
        style.bold("Prediction after each layer") + " (logit lens: the final norm and output layer applied to "
        f"the residual stream there); target {target} = {e.target_reason}"
    ]
    for row in e.lens:
        mark = f"  ← enters the top-{e.top_k} here" if row.name == e.target_enters_top_k else ""
        head = f"  {row.name:<11} target rank {row.target_rank:>5} p {row.target_probability:6.3f} | "
        room = width - display_width(head) - display_width(mark)
        guesses = ""
        for c in row.top:
            cell = f"{quoted(c.label)} {c.probability:.2f}  "
            if display_width(guesses + cell) > room:
                break
            guesses += cell
        lines.append(head + guesses.rstrip() + mark)
    if not e.target_enters_top_k:
        lines.append(f"  the target is not in the top-{e.top_k} after the last layer")
    return "\n".join(lines)


def what_mattered(e: Explanation, style: Style) -> str:
    a = e.attribution
    lines = [
        style.bold(f"What mattered for {quoted(e.target.label)}") + f" ({e.target_reason}, probability "
        f"{e.target.probability:.4f})"
    ]
    if e.occlusion:
        lines.append("  removing one earlier token (occlusion): change in its probability")
        for o in sorted(e.occlusion, key=lambda o: -abs(o.change))[:LIST_LIMIT]:
            token = clip(f"{o.index} {quoted(o.label)}", 18)
            lines.append(f"    {token:<19}{o.change:+8.4f}  → {o.probability_without:.4f}")
    else:
        lines.append("  (no earlier tokens to remove)")
    lines.append(f"  direct logit attribution: logit {a.logit:.4f} as a sum of parts, largest first")
    ranked = sorted(a.parts, key=lambda p: -abs(p.contribution))
    for p in ranked[:LIST_LIMIT]:
        lines.append(f"    {p.name:<26}{p.contribution:+9.4f}")
    rest = ranked[LIST_LIMIT:]
    if rest:
        lines.append(f"    {f'the other {len(rest)} parts':<26}{sum(p.contribution for p in rest):+9.4f}")
    lines.append(f"    {'sum of the parts':<26}{a.parts_sum:+9.4f}   (logit − sum = {a.difference:.1e})")
    if a.softcap:
        lines.append(
            f"    the model's softcap then gives {a.softcap} × tanh(logit / {a.softcap}) = {a.target.logit:.4f}"
        )
    lines.append(style.dim("  " + a.note))
    return "\n".join(lines)


def checks(e: Explanation, style: Style) -> str:
    c = e.checks
    return style.dim(
        f"checks (largest differences): rows sum to 1 ±{c.row_sum:.0e}; heads through the output "
        f"projection = attn_out ±{c.heads_to_attention_output:.0e}; parts = residual stream "
        f"±{c.parts_to_residual:.0e}; logits = generate's ±{c.logits_vs_generate:.0e}"
    )
