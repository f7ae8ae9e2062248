"""OpenAI's completions API without the HTTP: the request as a pydantic model, its prompts as token ids, the job
that generates the choices on the model thread, and the response and stream chunks in OpenAI's shapes.

A request's choices are generated one after another from one random generator, as `potion generate
--num-samples n` makes its samples, so a seeded request gives the same text as `potion generate --seed`.
Log-probabilities (logprobs=N) are the model's own, at temperature 1 (potion.infer.logprobs), of every token
drawn (the end-of-text token too, when it ends the text) and, with echo, of the prompt's tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from potion.config import SamplingConfig
from potion.errors import PotionError
from potion.infer.generate import Sample, continuation
from potion.infer.logprobs import MAX_TOP, Recorder, TokenLogprob, prompt_logprobs
from potion.serve.errors import ApiError
from potion.serve.logprobs import TextOffsets, Vocabulary, joined, legacy

MAX_TOKENS = 4096  # per choice
MAX_CHOICES = 16  # n times the number of prompts
MAX_STOPS = 4  # as OpenAI
FINISH_REASONS = {"eot": "stop", "stop": "stop", "length": "length"}  # potion's words -> OpenAI's


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Strict: "5" is not a number and an unknown field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM and llama.cpp take it too
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP)  # how many alternatives each token lists
    # OpenAI's, but not something potion does: accepted at their "off" values only (see unsupported)
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def sampling(self) -> SamplingConfig:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingConfig(
            max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(s for s in stop if s),
            num_samples=self.choices_per_prompt,
        )

    @property
    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    def unsupported(self) -> str | None:
        """The first field set to something potion serve does not do, or None."""
        off = {"suffix": None, "frequency_penalty": 0, "presence_penalty": 0}
        for name, value in off.items():
            given = getattr(self, name)
            if given is not None and given != value:
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            return "best_of"
        return None


@dataclass(frozen=True)
class Prompt:
    text: str  # as sent (decoded, when token ids were sent): what echo repeats
    ids: list[int]  # what the model reads: at most its context's worth, the last tokens


def prompt_list(prompt) -> list:
    """A request's prompt field as a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if not prompt:
        raise ApiError('prompt is an empty list; send a string ("" starts from end-of-text) or token ids', "prompt")
    return list(prompt)


def prepare(request: CompletionRequest, tokenizer, context_length: int) -> tuple[list[Prompt], list[str]]:
    """The prompts as token ids, and a warning for each prompt that was longer than the context."""
    prompts = prompt_list(request.prompt)
    if len(prompts) * request.choices_per_prompt > MAX_CHOICES:
        raise ApiError(
            f"{len(prompts)} prompts x n={request.choices_per_prompt} is {len(prompts) * request.choices_per_prompt}"
            f" choices; potion serve makes at most {MAX_CHOICES} per request",
            "n",
        )
    prepared, warnings = [], []
    for i, p in enumerate(prompts):
        name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        ids = token_ids(p, tokenizer, name)
        if len(ids) > context_length:
            warnings.append(
                f"{name} has {len(ids)} tokens; this model's context is {context_length}, so only its last "
                f"{context_length} are used"
            )
            ids = ids[-context_length:]
        prepared.append(Prompt(p if isinstance(p, str) else tokenizer.decode(p), ids))
    return prepared, warnings


def token_ids(prompt: str | list[int], tokenizer, name: str) -> list[int]:
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt, source=name) if prompt else []
        except PotionError as e:
            raise ApiError(str(e), "prompt") from None
        return ids or [tokenizer.eot_id]  # an empty prompt starts from end-of-text, as potion generate does
    bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise ApiError(f"{name} has token id {bad}; this model's ids are 0 to {tokenizer.vocab_size - 1}", "prompt")
    if not prompt:
        raise ApiError(f"{name} is an empty list of token ids", "prompt")
    return list(prompt)


# ---------------------------------------------------------------- the job (runs on the model thread)


@dataclass(frozen=True)
class ChoiceText:
    index: int
    text: str  # "" for a token that settled no text yet
    scores: tuple[TokenLogprob, ...] = ()  # the token's log-probabilities, when asked for


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    sample: Sample
    scores: tuple[TokenLogprob, ...] = ()  # the end-of-text token's, when it ended the text


@dataclass(frozen=True)
class PromptScores:
    prompt: int  # which prompt
    scores: list[TokenLogprob | None]  # its tokens' log-probabilities; None for the first


def completion_steps(
    served, prompts: list[Prompt], sampling: SamplingConfig, logprobs: int | None = None, echo: bool = False
) -> Generator:
    """Each prompt's n choices one after another, one token per step; with logprobs and echo, first the prompt's
    log-probabilities (one step)."""
    model, tokenizer = served.current()
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    for p, prompt in enumerate(prompts):
        if echo and logprobs is not None:
            yield PromptScores(p, prompt_logprobs(model, prompt.ids, logprobs, tokenizer.vocab_size))
        for c in range(sampling.num_samples):
            index = p * sampling.num_samples + c
            yield from choice_steps(model, tokenizer, index, prompt, sampling, generator, logprobs)


def choice_steps(model, tokenizer, index: int, prompt: Prompt, sampling, generator, logprobs: int | None):
    if sampling.max_new_tokens == 0:  # echo's way to score a prompt only
        yield ChoiceEnd(index, Sample("", 0, "length"))
        return
    recorder = Recorder(logprobs, tokenizer.vocab_size) if logprobs is not None else None
    idx = torch.tensor([prompt.ids], dtype=torch.long, device=next(model.parameters()).device)
    steps = continuation(model, tokenizer, idx, sampling, generator, on_logits=recorder)
    while True:
        try:
            text = next(steps)
        except StopIteration as finished:
            yield ChoiceEnd(index, finished.value, recorder.take() if recorder else ())
            return
        yield ChoiceText(index, text, recorder.take() if recorder else ())


# ---------------------------------------------------------------- OpenAI's shapes


@dataclass
class Choices:
    """What a request's job has made so far: each choice's Sample and log-probabilities."""

    samples: dict[int, Sample] = field(default_factory=dict)
    scores: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)  # choices whose first chunk has been streamed

    def take(self, item) -> None:
        if isinstance(item, (ChoiceText, ChoiceEnd)):
            self.scores.setdefault(item.index, []).extend(item.scores)
        if isinstance(item, ChoiceEnd):
            self.samples[item.index] = item.sample

    def completion_tokens(self) -> int:
        return sum(s.tokens for s in self.samples.values())


@dataclass
class Completion(Choices):
    """One completions request's response as it is put together."""

    model: str = ""
    prompts: list[Prompt] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    warnings: list[str] = field(default_factory=list)
    logprobs: int | None = None
    vocabulary: Vocabulary | None = None  # for logprobs
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_scores: dict[int, list] = field(default_factory=dict)
    offsets: dict[int, TextOffsets] = field(default_factory=dict)  # each streamed choice's, as it goes
    warned: bool = False  # the stream has sent the warnings

    def take(self, item) -> None:
        super().take(item)
        if isinstance(item, PromptScores):
            self.prompt_scores[item.prompt] = item.scores

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def usage(self) -> dict:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion_tokens = self.completion_tokens()
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def body(self) -> dict:
        choices = []
        for i, s in sorted(self.samples.items()):
            text = (self.prompt_of(i).text if self.echo else "") + s.text
            scores = None
            if self.logprobs is not None:
                offsets = self.new_offsets(i)
                scores = joined([*self.echoed_scores(i, offsets), self.scored(self.scores.get(i, []), offsets)])
            choices.append(choice(i, text, FINISH_REASONS[s.finish_reason], scores))
        extra = {"warnings": self.warnings} if self.warnings else {}
        return {**self.head(), "choices": choices, "usage": self.usage(), **extra}

    def new_offsets(self, index: int) -> TextOffsets:
        """Offsets into the choice's text, which starts with the prompt as sent when echoed (of which the model
        read only the last tokens when it was longer than the context)."""
        if not self.echo:
            return TextOffsets(self.vocabulary)
        prompt = self.prompt_of(index)
        cut = len(prompt.text) - len(self.vocabulary.tokenizer.decode(prompt.ids))
        return TextOffsets(self.vocabulary, max(0, cut))

    def echoed_scores(self, index: int, offsets: TextOffsets) -> list[dict]:
        if not self.echo:
            return []
        p = index // self.n
        return [legacy(self.vocabulary, self.prompts[p].ids, self.prompt_scores[p], offsets)]

    def scored(self, scores, offsets: TextOffsets) -> dict:
        return legacy(self.vocabulary, [s.token for s in scores], list(scores), offsets)

    def chunks(self, item) -> list[dict]:
        """The stream's chunks for one step of the job: the echoed prompt before a choice's first text, its text,
        its end. The first chunk carries the warnings, if any (a prompt cut to the context)."""
        self.take(item)
        if isinstance(item, PromptScores):
            return []
        chunks, i, asked = [], item.index, self.logprobs is not None
        if i not in self.started:
            self.started.add(i)
            offsets = self.offsets[i] = self.new_offsets(i) if asked else None
            if self.echo:
                scores = joined(self.echoed_scores(i, offsets)) if asked else None
                chunks.append(self.chunk(i, self.prompt_of(i).text, None, scores))
        scores = self.scored(item.scores, self.offsets[i]) if asked and item.scores else None
        if isinstance(item, ChoiceText) and (item.text or scores):
            chunks.append(self.chunk(i, item.text, None, scores))
        elif isinstance(item, ChoiceEnd):
            chunks.append(self.chunk(i, "", FINISH_REASONS[item.sample.finish_reason], scores))
        if chunks and self.warnings and not self.warned:
            chunks[0]["warnings"], self.warned = self.warnings, True
        return chunks

    def chunk(self, index: int, text: str, finish_reason: str | None = None, scores: dict | None = None) -> dict:
        """One server-sent event's data."""
        return {**self.head(), "choices": [choice(index, text, finish_reason, scores)]}

    def usage_chunk(self) -> dict:
        return {**self.head(), "choices": [], "usage": self.usage()}


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
