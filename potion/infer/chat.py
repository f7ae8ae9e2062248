"""`potion chat`: a conversation with a model, turn by turn.

Each turn renders the whole conversation with the model's chat template, as it was fine-tuned to read it, and
generates the assistant's reply until the template's end-of-turn marker. What the model cannot see (a conversation
longer than its context) is dropped from the oldest turn on, and said so, rather than cut mid-turn.

On a terminal it is a small REPL (/reset, /system TEXT, /help, /quit; Ctrl-C stops a reply, Ctrl-D ends the
session); with stdin from a file or a pipe, each line is one user turn and each reply is printed on one line of
its own, so it scripts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

import torch

from potion.config import SamplingConfig
from potion.data.chat import template_for, turn_ends
from potion.errors import PotionError
from potion.infer.generate import Sample, continuation

HELP = "/reset forgets the conversation, /system TEXT sets the system message, /quit ends (so does Ctrl-D)"


@dataclass
class Chat:
    """A conversation with one model: its messages so far, and how its replies are drawn."""

    model: torch.nn.Module
    tokenizer: object
    sampling: SamplingConfig
    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, oldest first
    context_length: int = 0  # tokens of conversation the model sees; 0 = the model's whole context

    def __post_init__(self):
        self.template = template_for(self.tokenizer)
        stops = tuple(dict.fromkeys([*self.sampling.stop, *turn_ends(self.template)]))
        self.sampling = replace(self.sampling, stop=stops, num_samples=1)
        device = next(self.model.parameters()).device
        seed = self.sampling.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt(self, turns: list[dict]) -> list[int]:
        text = self.template.render(self.messages(turns), add_generation_prompt=True)
        return self.tokenizer.encode(text, source="the conversation")

    def fitted_prompt(self, user_text: str) -> tuple[list[int], int]:
        """The prompt for the reply to user_text, and how many earlier turns were dropped to make room for it
        and for the reply (half the context at most is kept for the reply)."""
        context = self.context_length or self.model.config.context_length
        budget = context - min(self.sampling.max_new_tokens, context // 2)
        turns = [*self.turns, {"role": "user", "content": user_text}]
        dropped = 0
        while len(ids := self.prompt(turns)) > budget:
            if len(turns) == 1:
                raise PotionError(
                    f"this message makes a prompt of {len(ids)} tokens; the model's context of {context} tokens, "
                    f"{context - budget} of them kept for the reply, has room for {budget}: send a shorter one"
                )
            turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
            dropped = len(self.turns) + 1 - len(turns)
        return ids, dropped

    def reply(self, user_text: str, on_text=None) -> tuple[Sample, int]:
        """The assistant's reply to user_text, streamed to on_text(new_text) as it settles, and the number of
        turns dropped from the start of the conversation to fit it. The reply joins the conversation even when
        it was stopped early (Ctrl-C): the model sees what the user saw."""
        ids, dropped = self.fitted_prompt(user_text)
        self.turns = self.turns[dropped:]
        device = next(self.model.parameters()).device
        steps = continuation(
            self.model, self.tokenizer, torch.tensor([ids], device=device), self.sampling, self.generator
        )
        text = ""
        try:
            while True:
                piece = next(steps)
                text += piece
                if on_text and piece:
                    on_text(piece)
        except StopIteration as finished:
            sample = finished.value
        except KeyboardInterrupt:
            steps.close()
            sample = Sample(text, len(self.tokenizer.encode(text)) if text else 0, "interrupted")
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": sample.text}]
        return sample, dropped

    def reset(self) -> None:
        self.turns = []


# ---------------------------------------------------------------- the two front ends


def run_chat(chat: Chat, as_json: bool = False, stdin=None, stdout=None, stderr=None) -> int:
    """A REPL on a terminal; one reply per input line otherwise (as_json: one JSON object per line, for replies
    that span lines)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if stdin.isatty() and not as_json:
        return interactive(chat, stdout, stderr)
    for line in stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        sample, dropped = chat.reply(text)
        note_dropped(dropped, stderr)
        if as_json:
            body = {"reply": sample.text, "finish_reason": sample.finish_reason, "tokens": sample.tokens}
            stdout.write(json.dumps({**body, "dropped_messages": dropped}, ensure_ascii=False) + "\n")
        else:
            stdout.write(sample.text + "\n")
        stdout.flush()
    return 0


def interactive(chat: Chat, stdout, stderr) -> int:
    try:
        import readline  # noqa: F401 -- line editing and history for input(), where the platform has it
    except ImportError:
        pass
    stderr.write(f"chatting with the model ({HELP})\n")
    while True:
        try:
            text = input("> ")
        except EOFError:
            stdout.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line, as in a shell
            stdout.write("\n")
            continue
        if text.startswith("/"):
            if command(chat, text, stderr) == "quit":
                return 0
            continue
        if not text.strip():
            continue
        try:
            sample, dropped = chat.reply(text, on_text=lambda piece: (stdout.write(piece), stdout.flush()))
        except PotionError as e:  # a message too long for the model: the session goes on
            stderr.write(f"potion: error: {e}\n")
            continue
        stdout.write("\n" if sample.finish_reason != "interrupted" else " [stopped]\n")
        note_dropped(dropped, stderr)


def command(chat: Chat, text: str, stderr) -> str | None:
    name, _, argument = text.partition(" ")
    if name in ("/quit", "/exit", "/bye"):
        return "quit"
    if name == "/reset":
        chat.reset()
        stderr.write("(the conversation is forgotten)\n")
    elif name == "/system":
        chat.system = argument.strip() or None
        chat.reset()
        stderr.write(f"(system message {'set' if chat.system else 'removed'}; the conversation starts again)\n")
    else:
        stderr.write(f"({HELP})\n")
    return None


def note_dropped(dropped: int, stderr) -> None:
    if dropped:
        stderr.write(
            f"(the {dropped} oldest message{'s' if dropped > 1 else ''} no longer fit the model's context and "
            "were dropped)\n"
        )
        stderr.flush()
