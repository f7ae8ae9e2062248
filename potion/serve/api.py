"""The OpenAI-compatible routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions and POST
/v1/chat/completions (one JSON response, or server-sent events in OpenAI's chunk format with `stream: true`).

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
from potion.serve.chat import ChatCompletion, ChatRequest, prepare_chat
from potion.serve.completions import Completion, CompletionRequest, completion_steps, prepare
from potion.serve.errors import ApiError, from_validation
from potion.serve.logprobs import Vocabulary
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

    def refuse_unsupported(self, body) -> None:
        self.check_model(body.model)
        if (name := body.unsupported()) is not None:
            raise ApiError(f"{name} is not supported by potion serve; leave it out", name)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await parse(request, CompletionRequest)
        self.refuse_unsupported(body)
        try:
            sampling = body.sampling()
        except PotionError as e:
            raise ApiError(str(e), e.setting) from None
        served = self.served
        prompts, warnings = await run_in_threadpool(prepare, body, served.tokenizer, served.config.context_length)
        vocabulary = Vocabulary(served.tokenizer) if body.logprobs is not None else None
        completion = Completion(
            model=served.id,
            prompts=prompts,
            n=sampling.num_samples,
            echo=bool(body.echo),
            warnings=warnings,
            logprobs=body.logprobs,
            vocabulary=vocabulary,
        )
        job = submit(self.worker, completion_steps(served, prompts, sampling, body.logprobs, bool(body.echo)))
        return await self.respond(request, job, completion, body)

    async def chat_completions(self, request: Request) -> Response:
        body: ChatRequest = await parse(request, ChatRequest)
        self.refuse_unsupported(body)
        top, served = body.top, self.served
        prompt, sampling = await run_in_threadpool(prepare_chat, body, served.tokenizer, served.config.context_length)
        vocabulary = Vocabulary(served.tokenizer) if top is not None else None
        chat = ChatCompletion(model=served.id, prompt=prompt, vocabulary=vocabulary)
        job = submit(self.worker, completion_steps(served, [prompt], sampling, top))
        return await self.respond(request, job, chat, body)

    async def respond(self, request: Request, job: Job, shape, body) -> Response:
        """The whole response once the job is done, or (stream) its chunks as it goes."""
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self.stream(job, shape, usage), media_type="text/event-stream", headers=headers)
        if await while_connected(request, job, self.collect(job, shape)) is None:
            return Response(status_code=499)  # nobody reads it: the client has gone
        return JSONResponse(shape.body())

    @staticmethod
    async def collect(job: Job, shape):
        while True:
            event = await job.next_event()
            if event.kind == "error":
                raise job_error(event.value)
            if event.kind == "done":
                return shape
            shape.take(event.value)

    @staticmethod
    async def stream(job: Job, shape, include_usage: bool):
        """Server-sent events: the shape's chunks of each step, usage if asked, [DONE]."""
        try:
            while True:
                event = await job.next_event()
                if event.kind == "error":
                    yield sse(job_error(event.value).body())
                    return
                if event.kind == "done":
                    break
                for chunk in shape.chunks(event.value):
                    yield sse(chunk)
            if include_usage:
                yield sse(shape.usage_chunk())
            yield sse("[DONE]")
        finally:
            job.cancel()  # the client went away mid-stream, or the stream ended: either way nothing more to make
