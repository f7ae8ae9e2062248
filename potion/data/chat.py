"""Conversations: chat templates and the token ids (with a loss mask) a conversation becomes.

A chat template is a Jinja program that turns a list of messages into the text a model was trained to read:
SmolLM2's and Qwen's ChatML (`<|im_start|>user\\n...<|im_end|>`), Llama 3's headers, and so on. It comes with the
model (a GGUF file's `tokenizer.chat_template`, a Hugging Face folder's tokenizer_config.json or
chat_template.jinja); potion's own chat models use ChatML. A template from a stranger's file is untrusted code, so
it runs in jinja2's immutable sandbox, with the same settings and helpers as Hugging Face's apply_chat_template
(trim_blocks, lstrip_blocks, raise_exception, strftime_now, a tojson that keeps non-ASCII text), so that a model
reads exactly the text it was fine-tuned on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from potion.errors import PotionError

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as potion's own chat models are trained on it: every turn between <|im_start|>role and <|im_end|>
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IGNORE = -100  # a target that adds nothing to the loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it may name (bos_token, eos_token, ...)."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of a conversation, ending with the header of the assistant's next turn when asked."""
        try:
            program = compiled(self.source)
            return program.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except PotionError:
            raise
        except Exception as e:  # jinja2's TemplateError and SecurityError, or a bug in a stranger's template
            raise PotionError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def to_config(self) -> dict:
        """tokenizer_config.json's fields for it, as Hugging Face writes them (tokenizer.json keeps the same)."""
        return {"chat_template": self.source, **self.special_tokens}

    @classmethod
    def from_config(cls, config: dict, where: str) -> ChatTemplate | None:
        """The template of a tokenizer_config.json object; None when it names none."""
        source = named_template(config.get("chat_template"), where)
        return cls(source, special_tokens_of(config)) if source else None


@functools.lru_cache(maxsize=16)
def compiled(source: str):
    """The template as a sandboxed jinja2 program (compiled once per source)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PotionError(f"the chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes <, > and & for HTML, which is not what a model was trained to read
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, generation_block()]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise PotionError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def generation_block():
    """{% generation %}...{% endgeneration %} marks an assistant's text in some templates; it renders as its body."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlock


def template_for(tokenizer) -> ChatTemplate:
    """The template a model chats with: its own, or ChatML for a tokenizer that has ChatML's two tokens."""
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if all(tokenizer_has(tokenizer, token) for token in (IM_START, IM_END)):
        return ChatTemplate(CHATML)
    raise PotionError(
        "this model has no chat template and no <|im_start|>/<|im_end|> tokens: it continues text but was not "
        "trained to chat; fine-tune it on conversations first (potion train --init-from MODEL --data chats.jsonl)"
    )


def tokenizer_has(tokenizer, token: str) -> bool:
    """Whether token is one token of this vocabulary (a special token), not text spelled out in pieces."""
    try:
        return len(tokenizer.encode(token, source="a special token")) == 1
    except PotionError:  # a character vocabulary without its characters
        return False


# text that ends a turn in the common templates; a reply stops at whichever of these its template uses
TURN_ENDS = (IM_END, "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def turn_ends(template: ChatTemplate) -> tuple[str, ...]:
    """The stop strings of a reply: the end-of-turn markers the template writes, and its eos token."""
    eos = template.special_tokens.get("eos_token")
    written = [end for end in TURN_ENDS if end in template.source]
    return tuple(dict.fromkeys([*written, *([eos] if eos and eos in template.source else [])]))


# ---------------------------------------------------------------- where templates come from


def token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def special_tokens_of(config: dict) -> dict[str, str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    found = {name: token_content(config.get(name)) for name in names}
    return {name: value for name, value in found.items() if value is not None}


def named_template(value, where: str) -> str | None:
    """A chat_template field: one template, or a list of named ones ({"name", "template"}) of which "default" is
    the one chat uses."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        by_name = {t.get("name"): t.get("template") for t in value}
        chosen = by_name.get("default", next(iter(by_name.values()), None))
        if isinstance(chosen, str):
            return chosen
    raise PotionError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


def folder_template(folder: Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face folder (or a potion run): chat_template.jinja, else
    tokenizer_config.json's chat_template; None when it has neither."""
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise PotionError(f"'{config_path}' is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise PotionError(f"'{config_path}' is not a JSON object")
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            source = jinja_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PotionError(f"'{jinja_path}' is not UTF-8 text ({e})") from None
    else:
        return ChatTemplate.from_config(config, str(config_path))
    return ChatTemplate(source, special_tokens_of(config)) if source else None


# ---------------------------------------------------------------- messages


def checked_messages(messages, where: str = "the conversation") -> list[dict]:
    """messages as a template reads them: a non-empty list of {"role", "content"} with a known role and text
    content (OpenAI's list of {"type": "text", "text"} parts is joined into one text)."""
    if not isinstance(messages, list) or not messages:
        raise PotionError(f"{where} has no messages (a non-empty list of {{role, content}} objects)")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PotionError(f"{where}: message {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PotionError(f"{where}: message {i} has role {role!r}; the roles are {', '.join(ROLES)}")
        checked.append({**message, "content": message_text(content, f"{where}: message {i}")})
    return checked


def message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise PotionError(f"{where} has content of type {sorted(map(str, kinds - {'text'}))}; potion reads text only")
    raise PotionError(f"{where} has no text content (a string, or a list of text parts)")


# ---------------------------------------------------------------- conversation -> ids and loss mask


def conversation_pieces(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_reply) pieces: each assistant reply as the model would write
    it after its turn's header, the rest (system, user turns, headers) as context. Found by rendering the
    conversation up to each reply with and without it, so it works with any template that renders turns in
    order."""
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True)
        through = template.render(messages[: k + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise not_turn_by_turn()
        pieces += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    full = template.render(messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise not_turn_by_turn()
    pieces.append((full[len(done) :], False))
    return [(text, is_reply) for text, is_reply in pieces if text]


def not_turn_by_turn() -> PotionError:
    return PotionError("the chat template does not render a conversation turn by turn, so its replies cannot be found")


def conversation_ids(
    template: ChatTemplate, tokenizer, messages: list[dict], end_id: int
) -> tuple[list[int], list[bool]]:
    """A conversation's token ids and, for each, whether training learns to write it: the tokens of every
    assistant reply through the end-of-turn token (end_id) that closes it; not what follows that token (a
    newline between turns), not the system or user turns."""
    ids, learned = [], []
    for text, is_reply in conversation_pieces(template, messages):
        piece = tokenizer.encode(text, source="a conversation")
        mask = [is_reply] * len(piece)
        if is_reply and end_id in piece:
            end = piece.index(end_id)
            mask = [True] * (end + 1) + [False] * (len(piece) - end - 1)
        ids += piece
        learned += mask
    return ids, learned


def inputs_and_targets(ids: list[int], learned: list[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token training: the target at position t is token t+1 where that token is
    learned, else IGNORE."""
    targets = [token if keep else IGNORE for token, keep in zip(ids[1:], learned[1:])]
    return ids[:-1], targets
