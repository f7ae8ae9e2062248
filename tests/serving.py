"""A real `potion serve` in a subprocess on a free loopback port, and the tiny run directories it serves."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import torch
from test_explain import CHARS, tiny

from potion.config import ModelConfig, RunConfig
from potion.data.chat import CHATML, ChatTemplate
from potion.data.tokenizer import CharTokenizer, save_tokenizer
from potion.formats.run import write_config
from potion.model.gpt import GPT
from potion.train.checkpoint import model_state, save_tensors

READY = re.compile(r"potion serve: .* at (http://127\.0\.0\.1:\d+)/")


CHAT_CHARS = CHARS + "|_ABCDFGHIJKLNPQSTUVWXYZ?!.,'"  # ChatML's markers spelled out, and a user's sentences


def tiny_chat(context_length: int = 256):
    """A tiny random model that chats in ChatML, its markers spelled out in characters (so it has no end-of-turn
    token: its replies end at <|im_end|> as a stop string, or at end-of-text)."""
    torch.manual_seed(0)
    tok = CharTokenizer(CHAT_CHARS, chat_template=ChatTemplate(CHATML))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=context_length, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # untrained weights give almost equal probabilities; spread them so the tests can fail
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval(), tok


def make_run(folder: Path, flat: bool = False, chat: bool = False, context_length: int | None = None) -> Path:
    """A tiny run directory. flat: a model whose logits are all equal, so greedy decoding repeats token 0 and
    never ends its text (a generation that runs exactly as long as it is allowed to). chat: tiny_chat's."""
    model, tok = tiny_chat(context_length or 256) if chat else tiny(context_length=context_length or 32)
    if flat:
        with torch.no_grad():
            model.final_norm.weight.zero_()
            model.final_norm.bias.zero_()
    folder.mkdir(parents=True)
    base = RunConfig()
    write_config(folder, RunConfig(model=model.config, data=base.data, train=base.train))
    save_tokenizer(tok, folder / "tokenizer.json")
    save_tensors(folder / "model.safetensors", model_state(model))
    return folder


class Server:
    """`potion serve --port 0 ...` started in a subprocess; its stderr is collected as it comes."""

    def __init__(self, run_dir: Path, *args: str, timeout: float = 60):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "potion", "serve", "--model", str(run_dir), "--port", "0", *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_ready(timeout)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if m := READY.search(line):
                return m.group(1)
        self.stop()
        raise RuntimeError("potion serve did not start:\n" + "".join(self.stderr))

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one request; body is sent as is when it is bytes, else as JSON."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


IDLE = {"generating": 0, "waiting": 0}


def open_events(url: str, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming request whose first five events have arrived; the caller closes it."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(5):
        assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
    return connection, response


def seconds_until_idle_of(server: Server, model: str, limit: float = 10) -> float:
    """How long until the server generates nothing, and holds nothing waiting."""
    started = time.monotonic()
    while server.request("GET", "/api/health")[1] != {"status": "ok", "model": model, **IDLE}:
        assert time.monotonic() - started < limit, "the generation went on after its client left"
        time.sleep(0.02)
    return time.monotonic() - started
