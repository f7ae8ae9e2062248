"""The live page at / and the JSON it reads.

The page is the explain page (potion/explain/page.html, drawn by the same script) with a prompt box, a Generate
button, a chat panel for a model with a chat template (through /v1/chat/completions) and, for a run directory, its
loss curve. As the reader types it asks POST /api/explain for the same
Explanation `potion explain` computes and redraws; Generate streams from /v1/completions; GET /api/training gives
the losses of log.jsonl, the probes and whether a training still holds the run, polled while the page is open.
"""

from __future__ import annotations

import socket
import threading
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from potion.data.chat import template_for
from potion.errors import PotionError
from potion.explain import explain, load_json
from potion.explain.html import MAX_PROBES, probe_summary, render_page, thin
from potion.formats.fileio import process_exists
from potion.formats.run import LOCK_NAME, RunLock, loss_points, read_log
from potion.serve.api import job_result, parse, submit, while_connected
from potion.serve.completions import MAX_TOKENS
from potion.serve.served import file_stamp
from potion.serve.worker import ModelWorker, single_step

MAX_TRAIN_POINTS = 1000  # batch-loss points sent to the page; more are thinned evenly
STARTER_PROMPTS = ("Once upon a time", "The", "a")  # the first this model's tokenizer can read fills the prompt box
# The page fetches from this server only; the browser itself refuses anything else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'"
)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    token: int = -1
    layer: int | None = None
    head: int | None = None
    top_k: int = Field(5, ge=1, le=50)


def starter_prompt(served) -> str:
    for prompt in (served.run.config.train.probe, *STARTER_PROMPTS):
        try:
            if prompt and len(served.tokenizer.encode(prompt)) <= served.config.context_length:
                return prompt
        except PotionError:
            continue
    return ""


def training_process(run_dir: Path) -> int | None:
    """The process id of a training that holds run_dir on this host, or None. Only reads train.lock: taking the
    lock, even for a moment, could make a training that starts then fail."""
    try:
        holder = RunLock.holder((run_dir / LOCK_NAME).read_bytes())
    except OSError:
        return None
    if holder is None or holder[1] != socket.gethostname() or not process_exists(holder[0]):
        return None
    return holder[0]


class TrainingView:
    """What the page shows of a run's training, read again only when its files change."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self.lock = threading.Lock()
        self.log_seen: tuple | None = None
        self.log_losses: dict | None = None
        self.probes_seen: dict[Path, tuple] = {}  # path -> (its stamp, its summary)

    def state(self) -> dict:
        if self.run_dir is None:
            return {"training": None, "losses": None, "probes": []}
        with self.lock:
            return {"training": training_process(self.run_dir), "losses": self.losses(), "probes": self.probes()}

    def losses(self) -> dict | None:
        path = self.run_dir / "log.jsonl"
        stamp = file_stamp(path)
        if stamp != self.log_seen:
            rows = read_log(path) if stamp else []
            self.log_seen = stamp
            self.log_losses = {
                "train": thin(loss_points(rows, "train", "loss"), MAX_TRAIN_POINTS),
                "train_eval": loss_points(rows, "eval", "train_loss"),
                "val": loss_points(rows, "eval", "val_loss"),
            }
        return self.log_losses if self.log_seen else None

    def probes(self) -> list[dict]:
        paths = thin(sorted((self.run_dir / "probes").glob("step-*.json")), MAX_PROBES)
        seen, summaries = {}, []
        for path in paths:
            stamp = file_stamp(path)
            kept = self.probes_seen.get(path)
            if kept is None or kept[0] != stamp:
                try:
                    kept = (stamp, probe_summary(load_json(path)))
                except PotionError:  # being written, or damaged: left out
                    continue
            seen[path] = kept
            summaries.append(kept[1])
        self.probes_seen = seen
        return summaries


class LiveRoutes:
    def __init__(self, served, worker: ModelWorker, needs_key: bool):
        self.served, self.worker, self.needs_key = served, worker, needs_key
        self.training = TrainingView(served.run.run_dir if served.is_run else None)

    def page_html(self) -> str:
        folder = resources.files(__package__)
        controls = folder.joinpath("live.html").read_text(encoding="utf-8")
        script = "<script>\n" + folder.joinpath("live.js").read_text(encoding="utf-8") + "</script>"
        live = {
            "model": self.served.id,
            "needs_key": self.needs_key,
            "prompt": starter_prompt(self.served),
            "has_run": self.training.run_dir is not None,
            "max_tokens": MAX_TOKENS,
            "chat": self.has_chat_template(),
        }
        data = {"explanation": None, "probes": [], "live": live}
        return render_page(data, f"potion serve: {self.served.id}", controls, script)

    def has_chat_template(self) -> bool:
        try:
            template_for(self.served.tokenizer)
        except PotionError:  # a model that continues text only: no chat panel
            return False
        return True

    async def page(self, request: Request) -> Response:
        headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-store"}
        return HTMLResponse(self.page_html(), headers=headers)

    async def explain(self, request: Request) -> Response:
        body: ExplainRequest = await parse(request, ExplainRequest)
        job = submit(self.worker, single_step(self.explained, body))
        result = await while_connected(request, job, job_result(job))
        if result is None:
            return Response(status_code=499)
        return Response(result, media_type="application/json")

    def explained(self, body: ExplainRequest) -> str:
        """The explanation as JSON, made on the model thread (and turned into text there: it can be large)."""
        model, tokenizer = self.served.current()
        return explain(model, body.prompt, tokenizer, body.token, body.layer, body.head, body.top_k).to_json()

    async def training_state(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.training.state))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.served.id, **self.worker.counts()})
