"""What `potion explain` produces: one frozen, JSON-serialisable Explanation, and its files.

compute.py makes it from a model; the renderers (text.py, html.py, plot.py) only read it; training with a
probe prompt (`potion train --probe`) saves one per evaluation (RUN/probes/step-N.json). Numbering is 0-based
throughout, like the code: token 0, layer 0, head 0.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from potion.errors import PotionError
from potion.explain.html import repr_html, strict_json
from potion.formats.fileio import atomic_write_text

FORMAT = "potion-explain/1"
VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(text: str) -> str:
    """Token text with its boundaries made visible: a space is ·, a newline ↵, other control characters ␀-style."""
    return "".join(VISIBLE.get(c, chr(0x2400 + ord(c)) if ord(c) < 0x20 else c) for c in text)


@dataclass(frozen=True)
class Token:
    index: int
    id: int
    text: str
    label: str  # the text with spaces as · and newlines as ↵


@dataclass(frozen=True)
class Candidate:
    """One possible next token."""

    id: int
    text: str
    label: str
    probability: float
    logit: float
    rank: int  # 1 = the most likely


@dataclass(frozen=True)
class Expected:
    """The token the user expected next (--expect): its first token, wherever it ranks."""

    text: str  # as given
    candidate: Candidate
    tokens_in_text: int  # the expected text may be several tokens; only the first is scored
    in_top_k: bool


@dataclass(frozen=True)
class KeyWeight:
    """One earlier token (key) as seen by the focus token's query in one head."""

    index: int
    label: str
    score: float  # raw q.k
    scaled_score: float  # q.k / sqrt(head_dim)
    weight: float  # softmax of the scaled scores over the visible keys
    value_norm: float  # |v|: how much this token passes on in this head
    weighted_value_norm: float  # weight * |v|


@dataclass(frozen=True)
class WorkedExample:
    """The attention formula by hand for the focus token's query and its most-attended key."""

    query_index: int
    key_index: int
    head_dim: int
    query_entries: tuple[float, ...]  # the first WORKED_ENTRIES entries of q
    key_entries: tuple[float, ...]
    products: tuple[float, ...]  # q_i * k_i for the entries shown
    rest_of_dot_product: float  # the sum of the remaining head_dim - shown products
    dot_product: float  # the whole q.k, recomputed here from the vectors
    score: float  # the q.k the model computed (equal up to rounding)
    scale: float  # sqrt(head_dim)
    scaled_score: float
    shift: float  # 0, or the row's largest scaled score when exp would overflow (the weights do not change)
    exp_score: float  # exp(scaled_score - shift)
    exp_sum: float  # the same summed over every visible key
    weight: float  # exp_score / exp_sum
    note: str


@dataclass(frozen=True)
class HeadAttention:
    layer: int
    head: int
    weights: tuple[float, ...]  # on every visible key 0..focus, in prompt order
    keys: tuple[KeyWeight, ...]  # the top-k earlier tokens, most weight first
    other_weight: float  # weight on the visible keys not listed
    row_sum: float  # of all visible weights: 1 up to rounding
    worked: WorkedExample


@dataclass(frozen=True)
class AverageKey:
    index: int
    label: str
    weight: float  # mean over the layer's heads
    value_norm: float  # mean |v| over the heads
    weighted_value_norm: float  # mean of weight * |v|


@dataclass(frozen=True)
class HeadAverage:
    """The mean of one layer's heads: a summary for reading, not something the model computes."""

    layer: int
    label: str
    weights: tuple[float, ...]  # mean weight on every visible key 0..focus, in prompt order
    keys: tuple[AverageKey, ...]
    other_weight: float


@dataclass(frozen=True)
class LensLayer:
    """What the model would predict if the residual stream went to the output after this point."""

    after: int  # -1 = after the embeddings, i = after block i
    name: str
    top: tuple[Candidate, ...]
    target_rank: int
    target_probability: float


@dataclass(frozen=True)
class OcclusionEffect:
    index: int
    label: str
    probability_without: float
    change: float  # probability_without - probability with every token present


@dataclass(frozen=True)
class LogitPart:
    name: str
    kind: str  # token_embedding | position_embedding | head | attention_bias | mlp | norm_bias
    layer: int  # -1 where it does not belong to a block
    head: int  # -1 where it is not a head
    contribution: float


@dataclass(frozen=True)
class LogitAttribution:
    target: Candidate
    logit: float  # before any softcap: the part that is a sum
    parts: tuple[LogitPart, ...]
    parts_sum: float
    difference: float  # logit - parts_sum: float rounding only
    softcap: float  # 0 = none; else the reported logit is softcap * tanh(logit / softcap)
    note: str


@dataclass(frozen=True)
class AttentionMatrices:
    """Every token's attention, for pages where a click on any token shows its row.

    weights[layer][head][query] lists the weights on keys 0..query (later keys are masked); scores likewise holds
    the raw q.k; value_norms[layer][head][token] is |v|.
    """

    weights: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]
    scores: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]
    value_norms: tuple[tuple[tuple[float, ...], ...], ...]
    next_by_position: tuple[tuple[Candidate, ...], ...]  # each position's own top guesses for the next token


@dataclass(frozen=True)
class Checks:
    """Evidence that the numbers are the model's own; each is a largest absolute difference."""

    row_sum: float  # |sum of a weight row - 1|, every layer, head and token
    heads_to_attention_output: float  # sum over heads of context_h @ W_proj_h + bias vs the block's attn_out
    parts_to_residual: float  # embeddings + every attention and MLP output vs the final residual stream
    logits_vs_generate: float  # these logits vs potion.infer.generate.prefill on a KV cache
    lens_last_vs_logits: float  # the lens after the last block vs the real logits


@dataclass(frozen=True)
class ModelSummary:
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    context_length: int
    positions: str
    norm: str
    tokenizer: str
    vocab_size: int
    n_kv_head: int = 0  # key/value heads, shared by n_head / n_kv_head query heads each; 0 (older files): n_head

    @property
    def heads_text(self) -> str:
        """ "12 heads", or "9 query heads sharing 3 key/value heads" with grouped-query attention."""
        if self.n_kv_head and self.n_kv_head != self.n_head:
            return f"{self.n_head} query heads sharing {self.n_kv_head} key/value heads"
        return f"{self.n_head} heads"


@dataclass(frozen=True)
class Explanation:
    format: str
    prompt: str
    model: ModelSummary
    tokens: tuple[Token, ...]
    focus: int  # the token whose attention and next-token prediction are explained
    layer: int  # the layer and head the renderers show first
    head: int
    top_k: int
    prediction: tuple[Candidate, ...]  # what comes after the focus token
    expected: Expected | None
    target: Candidate  # the token "what mattered" is about: the expected one, else the top prediction
    target_reason: str
    masked: tuple[int, ...]  # positions after the focus token: hidden from it by the causal mask
    heads: tuple[HeadAttention, ...]  # layer-major: heads[layer * n_head + head]
    head_averages: tuple[HeadAverage, ...]
    lens: tuple[LensLayer, ...]
    target_enters_top_k: str  # the lens row where the target first enters the top-k and stays ("" = never)
    occlusion: tuple[OcclusionEffect, ...]
    attribution: LogitAttribution
    matrices: AttentionMatrices | None  # None when the prompt is too long to include every token's rows
    matrices_note: str
    checks: Checks
    notes: tuple[str, ...]
    step: int | None = None  # the training step, for probes saved during training

    def head_attention(self, layer: int, head: int) -> HeadAttention:
        return self.heads[layer * self.model.n_head + head]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _repr_html_(self) -> str:
        """In a notebook an Explanation shows itself as the explain page, offline (nothing is fetched)."""
        return repr_html(self)

    def to_json(self, indent: int | None = None) -> str:
        return strict_json(self.to_dict(), indent)

    @classmethod
    def from_dict(cls, d: dict, source: str = "explanation") -> Explanation:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PotionError(f"{source} is not potion explain data (expected format {FORMAT!r})")
        try:
            return _build(cls, d)
        except (TypeError, KeyError, ValueError) as e:
            raise PotionError(f"{source} is damaged or from another potion version ({e})") from None


def _build(tp, value):
    """Rebuild a (nested) dataclass from what to_dict wrote, following the field types."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _build(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        return tuple(_build(args[0], v) for v in value)
    if tp is float:
        return float(value)
    return value


def load_json(path: str | Path) -> Explanation:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PotionError(f"cannot read explain data '{p}' ({e})") from None
    return Explanation.from_dict(d, f"'{p}'")


def save_json(explanation: Explanation, path: str | Path) -> None:
    atomic_write_text(Path(path), explanation.to_json(indent=1) + "\n")


def probe_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "probes" / f"step-{step:08d}.json"


def load_probes(run_dir: str | Path) -> list[Explanation]:
    """The probes a run saved during training, in step order (empty if it saved none)."""
    folder = Path(run_dir) / "probes"
    if not folder.is_dir():
        return []
    return [load_json(p) for p in sorted(folder.glob("step-*.json"))]
