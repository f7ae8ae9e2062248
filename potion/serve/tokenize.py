"""The tokenizer over HTTP, as vLLM serves it: POST /tokenize, POST /detokenize, GET /tokenizer_info.

lm-evaluation-harness's `tokenizer_backend=remote` reads these to split a context from its continuation in the
model's own tokens, so it needs no copy of the tokenizer (and no download of one). potion's tokenizers add no
special tokens of their own (no beginning-of-sequence token), so add_special_tokens changes nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from potion.data.chat import checked_messages, template_for
from potion.errors import PotionError
from potion.serve.api import parse
from potion.serve.completions import token_ids
from potion.serve.errors import ApiError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None  # a conversation, tokenized as the chat completions API renders it
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class TokenizerRoutes:
    def __init__(self, served, check_model):
        self.served, self.check_model = served, check_model

    async def tokenize(self, request: Request) -> Response:
        body: TokenizeRequest = await parse(request, TokenizeRequest)
        if body.model is not None:
            self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError("send either prompt (a text) or messages (a conversation)", "prompt")
        ids = await run_in_threadpool(self.encoded, body)
        tokenizer = self.served.tokenizer
        strings = [tokenizer.token_text(i) for i in ids] if body.return_token_strs else None
        context = self.served.config.context_length
        return JSONResponse({"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strings})

    def encoded(self, body: TokenizeRequest) -> list[int]:
        tokenizer = self.served.tokenizer
        try:
            if body.messages is None:
                return tokenizer.encode(body.prompt, source="the prompt") if body.prompt else []
            template = template_for(tokenizer)
            text = template.render(checked_messages(body.messages, "messages"), body.add_generation_prompt)
            return tokenizer.encode(text, source="the conversation")
        except PotionError as e:
            raise ApiError(str(e), "prompt" if body.messages is None else "messages") from None

    async def detokenize(self, request: Request) -> Response:
        body: DetokenizeRequest = await parse(request, DetokenizeRequest)
        if body.model is not None:
            self.check_model(body.model)
        tokenizer = self.served.tokenizer
        ids = token_ids(body.tokens, tokenizer, "tokens") if body.tokens else []
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    async def tokenizer_info(self, request: Request) -> Response:
        tokenizer = self.served.tokenizer
        try:
            template = template_for(tokenizer)
        except PotionError:  # a model that continues text only
            template = None
        special = template.special_tokens if template is not None else {}
        return JSONResponse(
            {
                "tokenizer_class": type(tokenizer).__name__,
                "eos_token": tokenizer.token_text(tokenizer.eot_id),
                "bos_token": special.get("bos_token"),
                "pad_token": special.get("pad_token"),
                "chat_template": template.source if template is not None else None,
                "model_max_length": self.served.config.context_length,
                "vocab_size": tokenizer.vocab_size,
            }
        )
