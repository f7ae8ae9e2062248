"""The OpenAI-compatible routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions (one JSON response,
or server-sent events in OpenAI's chunk format with `stream: true`).

A client that goes away stops its generation: a stream's generator is closed when its connection drops, and a
request waiting for a whole response listens for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from potion.errors import PotionError
from potion.serve.completions import (
    FINISH_REASONS,
    ChoiceEnd,
    ChoiceText,
    Completion,
    CompletionRequest,
    completion_steps,
    prepare,
)
from potion.serve.errors import ApiError, from_validation
from potion.serve.worker import Busy, Job, ModelWorker, ShuttingDown

MAX_BODY = 1 << 20  # bytes; a prompt is at most a context's worth of tokens that matter


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body of a JSON request. Another site's page can make a browser send a form or plain text here without
    asking first, but not JSON: so only JSON is read."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise ApiError(
            f"send the body as JSON with 'Content-Type: application/json' (this request has {shown})", status=415
        )
    too_big = ApiError(f"the request body is larger than {limit // 1024} KiB", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model: type[BaseModel]):
    try:
        return model.model_validate_json(await read_body(request) or b"{}")
    except ValidationError as e:
        raise from_validation(e, list(model.model_fields)) from None


def submit(worker: ModelWorker, steps) -> Job:
    try:
        return worker.submit(steps)
    except (Busy, ShuttingDown) as e:
        raise ApiError(str(e), status=503) from None


def job_error(error: BaseException) -> ApiError:
    """What a failed job says to its client."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ShuttingDown):
        return ApiError(str(error), status=503)
    if isinstance(error, PotionError):
        return ApiError(str(error), error.setting)
    return ApiError(f"internal error ({type(error).__name__}: {error}); the server's log has the traceback", status=500)


async def job_result(job: Job):
    """The value the job returns, or its failure as the ApiError its client gets."""
    try:
        return await job.result()
    except Exception as e:
        raise job_error(e) from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, job: Job, work):
    """The result of the coroutine `work`, or None when the client leaves first (the job is then cancelled)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        job.cancel()
        return None
    finally:
        for t in (task, gone):
            t.cancel()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIRoutes:
    def __init__(self, served, worker: ModelWorker):
        self.served, self.worker = served, worker

    def model_card(self) -> dict:
        return {"id": self.served.id, "object": "model", "created": self.served.created, "owned_by": "potion"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    def check_model(self, name: str) -> None:
        if name not in self.served.names():
            raise ApiError(
                f"model '{name}' is not served here; this server serves '{self.served.id}'",
                "model",
                status=404,
                code="model_not_found",
            )

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await parse(request, CompletionRequest)
        self.check_model(body.model)
        if (name := body.unsupported()) is not None:
            raise ApiError(f"{name} is not supported by potion serve; leave it out", name)
        try:
            sampling = body.sampling()
        except PotionError as e:
            raise ApiError(str(e), e.setting) from None
        served = self.served
        prompts, warnings = await run_in_threadpool(prepare, body, served.tokenizer, served.config.context_length)
        completion = Completion(served.id, prompts, sampling.num_samples, bool(body.echo), warnings)
        job = submit(self.worker, completion_steps(served, prompts, sampling))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                self.stream(job, completion, usage), media_type="text/event-stream", headers=headers
            )
        if await while_connected(request, job, self.collect(job, completion)) is None:
            return Response(status_code=499)  # nobody reads it: the client has gone
        return JSONResponse(completion.body())

    @staticmethod
    async def collect(job: Job, completion: Completion) -> Completion:
        while True:
            event = await job.next_event()
            if event.kind == "error":
                raise job_error(event.value)
            if event.kind == "done":
                return completion
            if isinstance(event.value, ChoiceEnd):
                completion.samples[event.value.index] = event.value.sample

    @staticmethod
    async def stream(job: Job, completion: Completion, include_usage: bool):
        """Server-sent events: text chunks, a chunk with each choice's finish_reason, usage if asked, [DONE]. The
        first chunk carries the warnings, if any (a prompt cut to the context)."""
        started: set[int] = set()
        warnings = {"warnings": completion.warnings} if completion.warnings else {}
        try:
            while True:
                event = await job.next_event()
                if event.kind == "error":
                    yield sse(job_error(event.value).body())
                    return
                if event.kind == "done":
                    break
                for chunk in stream_chunks(completion, event.value, started):
                    yield sse({**chunk, **warnings})
                    warnings = {}
            if include_usage:
                yield sse(completion.usage_chunk())
            yield sse("[DONE]")
        finally:
            job.cancel()  # the client went away mid-stream, or the stream ended: either way nothing more to make


def stream_chunks(completion: Completion, item: ChoiceText | ChoiceEnd, started: set[int]) -> list[dict]:
    """The chunks one step of the job makes: the echoed prompt before a choice's first text, its text, its end."""
    chunks = []
    if item.index not in started:
        started.add(item.index)
        if completion.echo:
            chunks.append(completion.chunk(item.index, completion.prompt_of(item.index).text))
    if isinstance(item, ChoiceText) and item.text:
        chunks.append(completion.chunk(item.index, item.text))
    elif isinstance(item, ChoiceEnd):
        completion.samples[item.index] = item.sample
        chunks.append(completion.chunk(item.index, "", FINISH_REASONS[item.sample.finish_reason]))
    return chunks
