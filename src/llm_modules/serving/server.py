"""The FastAPI app: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` (JSON or SSE), ``/v1/models``,
``/health``, and the side-by-side page at ``/``.

Every request is validated before it is queued; everything a client can get wrong is answered with a 4xx in
OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``), anything else with a 500 in the same
shape: no request can stop the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import BatchLimits, EngineClosed, Event, GenerationRequest, QueueFull, Sampling
from .limits import BodyLimit
from .models import ServedModel
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    model_card,
    new_id,
    sse,
    text_choice,
    text_completion,
    usage,
)

DONE = "data: [DONE]\n\n"
GRACE_S = 30.0  # beyond a request's deadline, how long the server waits for its engine before giving up


@dataclass(frozen=True)
class ServerLimits:
    max_tokens: int = 1024              # the largest max_tokens a request may ask for
    default_max_tokens: int = 256       # when a request names none
    max_body_bytes: int = 1 << 20       # request bodies above it get a 413
    request_timeout_s: float = 300.0    # queue wait + decoding; a sequence past it ends with finish_reason "length"
    batch: BatchLimits = field(default_factory=BatchLimits)


def create_app(models: Sequence[ServedModel], limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The app serving ``models`` (the first is the default). Engines start here and stop with the app."""
    served = {m.id: m for m in models}
    default = models[0]
    for model in models:
        if model.engine is None:
            model.start(limits.batch)
    page = resources.files(__package__).joinpath("page/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for model in models:
            model.engine.close()

    app = FastAPI(title="llm-modules", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # larger bodies: 413 before any parsing

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return APIError(error.status_code, message).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}: {error}").response()

    # ------------------------------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": [
            {"id": m.id, "role": m.role, "queued": m.engine.queued, **m.engine.stats} for m in models]}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(m.id, m.role, m.created, **m.card()).model_dump() for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        model = resolve(model_id)
        return model_card(model.id, model.role, model.created, **model.card()).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        model = resolve(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = model.render(messages)
        except Exception as error:  # the chat template refused this conversation (jinja raise_exception)
            raise APIError(400, f"the model's chat template refused these messages: {error}", "messages") from error
        job = await admit(model, body, [prompt], chat=True)
        if body.stream:
            return StreamingResponse(stream_chat(job, body.include_usage), media_type="text/event-stream")
        result = await job.collect()
        return JSONResponse(chat_completion(job.id, model.id, result.texts[0], result.reasons[0],
                                            usage(job.prompt_tokens, result.tokens), result.gates).model_dump(exclude_none=True))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        model = resolve(body.model)
        job = await admit(model, body, body.prompt, chat=False)
        if body.stream:
            return StreamingResponse(stream_text(job, body.include_usage), media_type="text/event-stream")
        result = await job.collect()
        choices = [text_choice(i, text, reason) for i, (text, reason) in enumerate(zip(result.texts, result.reasons))]
        response = text_completion(job.id, model.id, job.created, choices, usage(job.prompt_tokens, result.tokens),
                                   result.gates)
        return JSONResponse(response.model_dump(exclude_none=True))

    # ----------------------------------------------------------------------------------------- helpers
    def resolve(name: str | None) -> ServedModel:
        if name is None:
            return default
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist here; served: {', '.join(served)}", "model",
                           "model_not_found")
        return served[name]

    async def admit(model: ServedModel, body: ChatCompletionRequest | CompletionRequest, prompts: list[str],
                    chat: bool) -> Job:
        """Check the request against the limits, tokenize it and queue one sequence per prompt."""
        problem = body.unsupported()
        if problem:
            raise problem
        requested = body.token_limit
        if requested is not None and requested > limits.max_tokens:
            raise APIError(400, f"max_tokens={requested} is above this server's limit of {limits.max_tokens} "
                                "(llm-modules serve --max-tokens)", "max_tokens", "max_tokens_too_large")
        ids = await run_in_threadpool(lambda: [model.encode(p, chat) for p in prompts])
        longest = max(len(i) for i in ids)
        room = model.context_length - longest
        if room < 1 or (requested is not None and requested > room):
            raise APIError(400, f"the prompt has {longest} tokens and asks for up to {requested or 1} more; "
                                f"{model.id} takes {model.context_length} in all", "messages" if chat else "prompt",
                           "context_length_exceeded")
        sampling = Sampling(
            max_tokens=requested if requested is not None else min(limits.default_max_tokens, room),
            temperature=body.temperature if body.temperature is not None else _default(model, "temperature"),
            top_p=body.top_p if body.top_p is not None else _default(model, "top_p"),
            seed=body.seed,
            stop=tuple(body.stop),
        )
        job = Job(model.id, "chatcmpl" if chat else "cmpl", len(prompts), sum(len(i) for i in ids),
                  time.monotonic() + limits.request_timeout_s)
        job.requests = [GenerationRequest(i, prompt_ids, sampling, job.deliver, job.deadline)
                        for i, prompt_ids in enumerate(ids)]
        try:
            model.engine.submit(job.requests)
        except EngineClosed as error:
            raise APIError(503, str(error), code="shutting_down") from error
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}; retry later", code="queue_full") from error
        return job

    async def stream_chat(job: Job, include_usage: bool) -> AsyncIterator[str]:
        with job.cancel_on_exit():
            yield sse(chat_chunk(job.id, job.model, job.created, ChoiceDelta(role="assistant", content="")))
            async for event in job.events():
                if event.error:
                    yield sse(APIError(event.status, event.error).body())
                    break
                if event.text:
                    yield sse(chat_chunk(job.id, job.model, job.created, ChoiceDelta(content=event.text)))
                if event.finish_reason:
                    yield sse(chat_chunk(job.id, job.model, job.created, ChoiceDelta(), event.finish_reason,
                                         gate_values=event.gate_values))
            else:
                if include_usage:
                    yield sse(chat_chunk(job.id, job.model, job.created, tokens=usage(job.prompt_tokens, job.tokens)))
            yield DONE

    async def stream_text(job: Job, include_usage: bool) -> AsyncIterator[str]:
        with job.cancel_on_exit():
            async for event in job.events():
                if event.error:
                    yield sse(APIError(event.status, event.error).body())
                    break
                if event.text or event.finish_reason:
                    choice = text_choice(event.index, event.text, event.finish_reason)
                    yield sse(text_completion(job.id, job.model, job.created, [choice], gate_values=event.gate_values))
            else:
                if include_usage:
                    yield sse(text_completion(job.id, job.model, job.created, [],
                                              usage(job.prompt_tokens, job.tokens)))
            yield DONE

    return app


def _default(model: ServedModel, name: str) -> float:
    """A sampling setting the request left out: the model's generation config when it samples, else OpenAI's 1.0."""
    config = getattr(model.model, "generation_config", None)
    value = getattr(config, name, None) if getattr(config, "do_sample", False) else None
    return float(value) if value is not None else 1.0


def validation_error(errors: Sequence[dict]) -> APIError:
    """The first of pydantic's errors as an OpenAI 400 (malformed JSON included)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
    return APIError(400, message, param, "invalid_value")


@dataclass
class Result:
    texts: list[str]
    reasons: list[str]
    tokens: int
    gates: list | None


class Job:
    """One HTTP request's sequences: the engine thread delivers their events, the request's coroutine reads them."""

    def __init__(self, model: str, prefix: str, count: int, prompt_tokens: int, deadline: float) -> None:
        self.id = new_id(prefix)
        self.model = model
        self.count = count
        self.prompt_tokens = prompt_tokens
        self.deadline = deadline
        self.created = int(time.time())
        self.requests: list[GenerationRequest] = []
        self.tokens = 0  # completion tokens of the finished sequences
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            pass

    async def events(self) -> AsyncIterator[Event]:
        """Events until every sequence finished (or one failed); a stuck engine ends it with a 503 past the deadline."""
        remaining = self.count
        while remaining:
            try:
                timeout = max(0.0, self.deadline - time.monotonic()) + GRACE_S
                event = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                yield Event(0, error="the request ran past its time limit", status=503)
                return
            if event.finish_reason:
                remaining -= 1
                self.tokens += event.completion_tokens
            yield event
            if event.error:
                return

    async def collect(self) -> Result:
        texts, reasons, gates = [""] * self.count, ["length"] * self.count, None
        with self.cancel_on_exit():
            async for event in self.events():
                if event.error:
                    raise APIError(event.status, event.error)
                texts[event.index] += event.text
                if event.finish_reason:
                    reasons[event.index] = event.finish_reason
                    gates = event.gate_values if event.gate_values is not None else gates
        return Result(texts, reasons, self.tokens, gates)

    @contextmanager
    def cancel_on_exit(self) -> Iterator[None]:
        """On leaving (done, error, or the client went away), tell the engine to drop what is left of the job."""
        try:
            yield
        finally:
            for request in self.requests:
                request.cancelled = True
