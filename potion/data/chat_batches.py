"""Batches of conversations: one conversation a row, cut to the context, padded to the longest of its batch.

Padding rather than packing: a row holds one conversation from its first token, so it sees the positions and the
context it will see when it chats, and the model needs no mask between conversations (attention is causal: a
conversation's tokens never see the padding after it, and padding's targets are IGNORE). What padding costs is
bounded twice: each batch is trimmed to its longest conversation, rounded up to a multiple of PAD_MULTIPLE
positions so that a compiled model sees a few shapes, not one per batch; and the conversations are drawn
POOL_BATCHES batches at a time, sorted by length and cut into batches that are then taken in a random order, so
that a batch holds conversations of similar length. On pydocs-chat (BPE, a context of 256, batches of 16) that
took the share of padding from 62% (one random batch at a time, to multiples of 64) to 26%; chat_facts measures
it for every run.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from potion.config import TrainConfig
from potion.data.chat import IGNORE
from potion.data.conversations import ConversationSpan
from potion.errors import PotionError

PAD_MULTIPLE = 32
POOL_BATCHES = 32
MEASURED_BATCHES = 100  # the first training batches, drawn ahead to measure the share of padding


def padded_batch(rows: list[tuple[np.ndarray, np.ndarray]], context_length: int, pad_id: int):
    """(inputs, targets), each (B, W) int64, from conversations' (ids, reply mask), each cut to its first
    context_length + 1 tokens: W is the longest row's length rounded up to PAD_MULTIPLE (at most context_length);
    a target that is not a reply token, or is padding, is IGNORE."""
    rows = [(ids[: context_length + 1], learned[: context_length + 1]) for ids, learned in rows]
    longest = max(len(ids) - 1 for ids, _ in rows)
    width = min(context_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for r, (ids, learned) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(learned[1:], ids[1:], IGNORE)
    return torch.from_numpy(x), torch.from_numpy(y)


def with_replies(conversations: ConversationSpan, context_length: int) -> np.ndarray:
    """The indices of the conversations with at least one reply token among their first context_length targets:
    a row with none would teach nothing (and a batch of such rows has no loss at all)."""
    kept = [i for i in range(len(conversations)) if conversations.conversation(i, context_length + 1)[1][1:].any()]
    return np.asarray(kept, dtype=np.int64)


class ChatBatches:
    """Random conversations, batch_size a batch; the order is a seeded generator whose state can be saved. As
    Batches does, every process draws the whole batch and keeps its `rows` of it."""

    def __init__(
        self,
        conversations: ConversationSpan,
        context_length: int,
        batch_size: int,
        seed: int,
        split: str = "training",
        rows: slice = slice(None),
    ):
        self.conversations, self.context_length = conversations, context_length
        self.usable = with_replies(conversations, context_length)
        if not len(self.usable):
            raise PotionError(
                f"none of the {len(conversations)} conversations of the {split} split has a reply within the first "
                f"{context_length} tokens; use a longer context (--set context_length=...)"
            )
        self.batch_size, self.rows = batch_size, rows
        self.pad_id = conversations.tokenizer.eot_id
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.pool, self.taken, self.pool_start = None, 0, None  # the batches drawn together, and how many are used
        self.facts: dict = {}  # chat_facts', once measured

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is None or self.taken == len(self.pool):
            self.pool_start = self.rng.bit_generator.state
            self.pool, self.taken = self.draw_pool(), 0
        picks, self.taken = self.pool[self.taken], self.taken + 1
        x, y = self.batch_of(picks)
        return x[self.rows], y[self.rows]

    def draw_pool(self) -> np.ndarray:
        """POOL_BATCHES batches of random conversations, (POOL_BATCHES, batch_size) indices: drawn together, sorted
        by length, cut into batches, and those shuffled."""
        picks = self.usable[self.rng.integers(0, len(self.usable), size=POOL_BATCHES * self.batch_size)]
        picks = picks[np.argsort(self.conversations.lengths()[picks], kind="stable")]
        return picks.reshape(POOL_BATCHES, self.batch_size)[self.rng.permutation(POOL_BATCHES)]

    def batch_of(self, picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.context_length + 1
        rows = [self.conversations.conversation(int(i), limit) for i in picks]
        return padded_batch(rows, self.context_length, self.pad_id)

    def replay(self) -> ChatBatches:
        """A copy that draws the batches this one draws next, whole (every process's rows), leaving this one's
        order untouched."""
        twin = copy.copy(self)
        twin.rows, twin.rng = slice(None), np.random.Generator(np.random.PCG64(0))
        twin.set_state(self.state())
        return twin

    def state(self) -> dict:
        """Where the order stands: the generator as it was when the current pool was drawn, and the batches of
        that pool already taken (the pool is drawn again from it on resume)."""
        if self.pool is None or self.taken == len(self.pool):
            return {"rng": self.rng.bit_generator.state, "taken": 0}
        return {"rng": self.pool_start, "taken": self.taken}

    def set_state(self, state: dict) -> None:
        taken = state["taken"]
        if type(taken) is not int or not 0 <= taken < POOL_BATCHES:
            raise ValueError(f"the batch order's position {taken!r} is not a batch of a pool of {POOL_BATCHES}")
        self.rng.bit_generator.state = state["rng"]
        self.pool, self.taken = None, 0
        if taken:
            self.pool_start = state["rng"]
            self.pool, self.taken = self.draw_pool(), taken


def fixed_chat_batches(source: ChatBatches, count: int, seed: int | None = None) -> list:
    """The same batches every time, for evaluation: count batches of the split's conversations with a reply, the
    first ones in order (seed None: the validation split, every held-out conversation while they last) or a seeded
    sample of them. Each batch holds conversations of similar length, to pad little; the last is filled up from
    the start when the split runs short, so every batch is whole."""
    usable = source.usable
    if seed is not None:
        usable = np.random.Generator(np.random.PCG64(seed)).permutation(usable)
    chosen = usable[: count * source.batch_size]
    n_batches = -(-len(chosen) // source.batch_size)
    chosen = np.resize(chosen, n_batches * source.batch_size)  # np.resize repeats from the start
    lengths = source.conversations.lengths()[chosen]
    chosen = chosen[np.argsort(lengths, kind="stable")]
    return [source.batch_of(part) for part in chosen.reshape(n_batches, source.batch_size)]


def chat_training_data(train: ConversationSpan, val: ConversationSpan, context_length: int, tc: TrainConfig, rows):
    """setup.training_data for conversations: the training batches (this process's rows), the fixed evaluation
    batches (whole), and the number of training tokens."""
    batches = ChatBatches(train, context_length, tc.batch_size, tc.seed, "training", rows)
    held_out = ChatBatches(val, context_length, tc.batch_size, tc.seed, "validation")
    eval_sets = {
        "train": fixed_chat_batches(batches, tc.eval_batches, tc.seed + 1),
        "val": fixed_chat_batches(held_out, tc.eval_batches),
    }
    batches.facts = chat_facts(batches, held_out)
    return batches, eval_sets, train.n_tokens


def chat_facts(batches: ChatBatches, held_out: ChatBatches) -> dict:
    """What a chat run's data costs: conversations cut to the context or left out (no reply within it), and over
    the first MEASURED_BATCHES training batches the shares of their positions that are padding and reply tokens."""
    limit = batches.context_length + 1
    lengths = np.concatenate([batches.conversations.lengths(), held_out.conversations.lengths()])
    n_all = len(lengths)
    ahead = batches.replay()
    positions = padding = replies = 0
    for _ in range(MEASURED_BATCHES):
        x, y = ahead.next()
        used = np.minimum(batches.conversations.lengths()[ahead.pool[ahead.taken - 1]], limit) - 1
        positions, padding = positions + x.numel(), padding + x.numel() - int(used.sum())
        replies += int((y != IGNORE).sum())
    return {
        "conversations": n_all,
        "validation_conversations": len(held_out.conversations),
        "truncated": int((lengths > limit).sum()),
        "left_out": n_all - len(batches.usable) - len(held_out.usable),
        "padding_share": round(padding / positions, 4),
        "reply_share": round(replies / positions, 4),
        "mean_batch_positions": round(positions / MEASURED_BATCHES),
    }


def describe(facts: dict, context_length: int) -> str:
    """The one line a chat run starts with."""
    cut = f"{facts['truncated']:,} longer than the context of {context_length} tokens are cut to it"
    left = f", {facts['left_out']:,} with no reply within it are left out" if facts["left_out"] else ""
    return (
        f"potion: {facts['conversations']:,} conversations ({facts['validation_conversations']:,} held out for "
        f"validation); {cut}{left}; in a batch, {100 * facts['padding_share']:.0f}% of the positions are padding "
        f"and {100 * facts['reply_share']:.0f}% are reply tokens (the loss is on those alone)"
    )
