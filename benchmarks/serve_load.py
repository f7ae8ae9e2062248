"""Load on `potion serve`: concurrent clients on loopback for a bounded time; requests/s, tokens/s, latency, errors.

The server runs in its own process, as a user would start it, serving a run directory with random weights of a
preset's shape (speed does not depend on what the model learned) or --model RUN. Each client keeps one HTTP
connection and sends completions one after another until the time is up, every other one streamed (server-sent
events, with usage); a request counts as an error unless it is a 200 with the tokens it reports (and, streamed,
ends with [DONE]). Latency is from sending the request to its last byte; time to first token is for the streamed
ones. Tokens are completion tokens (usage.completion_tokens).

Usage (from the project root):
    python benchmarks/serve_load.py --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import dtype_name, emit, result  # noqa: E402

from potion.config import RunConfig, load_preset  # noqa: E402
from potion.data.tokenizer import CharTokenizer, save_tokenizer  # noqa: E402
from potion.formats.run import write_config  # noqa: E402
from potion.infer.generate import decoding_dtype  # noqa: E402
from potion.model import GPT  # noqa: E402
from potion.serve.server import serving_threads  # noqa: E402
from potion.train.checkpoint import model_state, save_tensors  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "JULIET:\nO Romeo, Romeo", "KING HENRY:\n", "To be"]
READY = re.compile(r"at (http://127\.0\.0\.1:(\d+))/")


def random_run(folder: Path, preset: str) -> GPT:
    """A run directory with a preset's shape, random weights and a character vocabulary."""
    tok = CharTokenizer(
        sorted(set("".join(PROMPTS) + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n"))
    )
    config = load_preset(preset)
    model_config = type(config.model)(**{**config.model.__dict__, "vocab_size": tok.vocab_size, "dropout": 0.0})
    model = GPT(model_config).eval()
    write_config(folder, RunConfig(model=model_config, data=config.data, train=config.train))
    save_tokenizer(tok, folder / "tokenizer.json")
    save_tensors(folder / "model.safetensors", model_state(model))
    return model


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(connection: http.client.HTTPConnection, body: dict) -> tuple[int, float | None]:
    """(completion tokens, seconds to the first text or None); raises on anything but a complete answer."""
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    if not body["stream"]:
        return json.loads(response.read())["usage"]["completion_tokens"], None
    first, usage, done = None, None, False
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if first is None and any(c["text"] for c in chunk["choices"]):
            first = time.perf_counter() - started
        usage = chunk.get("usage") or usage
    if not done or usage is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    return usage["completion_tokens"], first


def client(port: int, deadline: float, index: int, max_tokens: int, tally: Tally) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while time.perf_counter() < deadline:
        stream = (index + i) % 2 == 1
        body = {"model": "load", "prompt": PROMPTS[(index + i) % len(PROMPTS)], "max_tokens": max_tokens}
        body.update(temperature=0.8, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
        started = time.perf_counter()
        try:
            tokens, first = one_request(connection, body)
        except Exception as e:  # counted, and the connection started afresh
            with tally.lock:
                tally.errors.append(f"{type(e).__name__}: {e}")
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        else:
            with tally.lock:
                tally.latencies.append(time.perf_counter() - started)
                tally.tokens += tokens
                if first is not None:
                    tally.first_tokens.append(first)
        i += 1
    connection.close()


def start_server(run: Path, threads: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "potion", "serve", "--model", str(run), "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    for line in server.stderr:
        if m := READY.search(line):
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its pipe drained
            return server, int(m.group(2))
    raise SystemExit("potion serve did not start")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="the model's shape (random weights)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="clients start no request after this")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=serving_threads(), help="the server's torch threads")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "load"
        run.mkdir()
        model = random_run(run, args.preset)
        server, port = start_server(run, args.threads)
        try:
            tally, started = Tally(), time.perf_counter()
            deadline = started + args.seconds
            workers = [
                threading.Thread(target=client, args=(port, deadline, i, args.max_tokens, tally))
                for i in range(args.clients)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(30)
    emit(
        {
            **result("serve_load", "cpu", torch.float32, args.threads),
            "decode_dtype": dtype_name(decoding_dtype(model)),
            "preset": args.preset,
            "parameters": model.num_parameters(),
            "clients": args.clients,
            "seconds": round(elapsed, 2),
            "max_tokens": args.max_tokens,
            "requests": len(tally.latencies),
            "requests_per_second": round(len(tally.latencies) / elapsed, 2),
            "tokens_per_second": round(tally.tokens / elapsed, 1),
            "latency_p50_s": round(percentile(tally.latencies, 50), 3),
            "latency_p99_s": round(percentile(tally.latencies, 99), 3),
            "first_token_p50_s": round(percentile(tally.first_tokens, 50), 3),
            "errors": len(tally.errors),
            "first_errors": tally.errors[:3],
        }
    )


if __name__ == "__main__":
    main()
