"""OpenAI-compatible HTTP routes over the engine (Starlette, run by uvicorn), and the chat page.

  POST /v1/chat/completions   messages with text and image_url parts; plain JSON or server-sent events
  GET  /v1/models             the one model served (its id: the workdir's folder name)
  GET  /health                load and compile counters
  GET  /                      the chat page (vlm_jax/serve/page/, nothing loaded from elsewhere)

Errors are OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 404 unknown model or
route, 413 body too large, 503 shutting down. uvicorn handles SIGTERM: it stops listening, lets the requests
in flight finish, then the lifespan's exit closes the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vlm_jax.config import InputError
from vlm_jax.serve import messages
from vlm_jax.serve.engine import Delta, Engine, EngineClosed, Finish, Request
from vlm_jax.serve.messages import APIError

PAGE_DIR = os.path.join(os.path.dirname(__file__), "page")
MAX_BODY_BYTES = 64 << 20


def _error(e: APIError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


def _usage(f: Finish) -> dict:
  return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
          "total_tokens": f.prompt_tokens + f.completion_tokens}


def _sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ChatServer:
  """The routes' state: the engine, the model id and the request limits."""

  def __init__(self, engine: Engine, model_id: str, allow_local_files: bool = False):
    self.engine, self.model_id, self.allow_local_files = engine, model_id, allow_local_files
    self.created = int(time.time())
    self.closing = False

  async def _read(self, request: HTTPRequest):
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
      raise APIError(413, f"The body is over {MAX_BODY_BYTES >> 20} MiB.", None, "body_too_large")
    raw = await request.body()
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(400, f"The body is not valid JSON ({e}).", None, "invalid_json") from e
    return messages.parse(body, model_id=self.model_id, max_images=self.engine.max_images,
                          allow_local_files=self.allow_local_files)

  def _request(self, chat: messages.ChatRequest, emit) -> Request:
    """The engine request for a parsed body, after the checks that need the tokens."""
    try:
      encoded = self.engine.encode(chat.turns, chat.images)
    except (InputError, ValueError) as e:
      raise APIError(400, str(e), "messages") from e
    n, context = len(encoded["input_ids"]), self.engine.context
    if len(encoded["tiles"]) > self.engine.tile_slots:
      raise APIError(400, f"The images make {len(encoded['tiles'])} tiles; this server holds "
                     f"{self.engine.tile_slots} per request (--max-images).", "messages", "too_many_images")
    if n >= context:
      raise APIError(400, f"The prompt is {n} tokens (images included); the model's context holds {context}. "
                     "Shorten the conversation or send fewer images.", "messages", "context_length_exceeded")
    max_tokens = context - n if chat.max_tokens is None else chat.max_tokens
    if n + max_tokens > context:
      raise APIError(400, f"The prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                     f"{context} tokens: ask for at most {context - n}.", "max_tokens", "context_length_exceeded")
    return Request(encoded["input_ids"], encoded["tiles"], max_tokens, emit, temperature=chat.temperature,
                   top_k=chat.top_k, top_p=chat.top_p, seed=chat.seed, stop=chat.stop,
                   min_tokens=min(chat.min_tokens, max_tokens))

  async def chat_completions(self, request: HTTPRequest):
    try:
      chat = await self._read(request)
      loop, queue = asyncio.get_running_loop(), asyncio.Queue()
      emit = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731
      job = await run_in_threadpool(self._request, chat, emit)
      if self.closing:
        raise EngineClosed("shutting down")
      self.engine.submit(job)
    except APIError as e:
      return _error(e)
    except EngineClosed:
      return _error(APIError(503, "The server is shutting down; retry on another one.", None, "shutting_down",
                             "server_error"))
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}
    if chat.stream:
      return StreamingResponse(self._stream(job, queue, head, chat.include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    try:
      while not isinstance(event := await queue.get(), Finish):
        pass
    except asyncio.CancelledError:
      job.cancel()
      raise
    if event.finish_reason == "error":
      return _error(APIError(500, f"Generation failed: {event.text}", None, "generation_failed", "server_error"))
    return JSONResponse({**head, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": event.text}, "logprobs": None,
         "finish_reason": event.finish_reason}], "usage": _usage(event)})

  async def _stream(self, job: Request, queue: asyncio.Queue, head: dict, include_usage: bool):
    """OpenAI's chunks: the role, the text as it comes, the finish_reason, the usage (if asked), [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    chunk = lambda delta, reason=None: _sse({**head, "choices": [  # noqa: E731
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra})
    finished = False
    try:
      yield chunk({"role": "assistant", "content": ""})
      while True:
        event = await queue.get()
        if isinstance(event, Delta):
          yield chunk({"content": event.text})
          continue
        finished = True
        if event.finish_reason == "error":
          yield _sse(APIError(500, f"Generation failed: {event.text}", None, "generation_failed",
                              "server_error").body())
          break
        yield chunk({}, event.finish_reason)
        if include_usage:
          yield _sse({**head, "choices": [], "usage": _usage(event)})
        break
      yield "data: [DONE]\n\n"
    finally:
      if not finished:  # the client went away: free the slot
        job.cancel()

  async def models(self, request: HTTPRequest):
    del request
    return JSONResponse({"object": "list", "data": [
        {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vlm-jax"}]})

  async def health(self, request: HTTPRequest):
    del request
    return JSONResponse({"status": "shutting_down" if self.closing else "ok", "model": self.model_id,
                         **self.engine.load(), "compiled_programs": self.engine.compiled_programs()})

  async def page(self, request: HTTPRequest):
    del request
    return FileResponse(os.path.join(PAGE_DIR, "index.html"))

  def app(self) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
      del app
      self.engine.start()
      yield
      self.closing = True
      await run_in_threadpool(self.engine.close)

    async def http_error(request, exc: HTTPException):
      del request
      return _error(APIError(exc.status_code, f"{exc.detail}: see GET /v1/models, POST /v1/chat/completions.",
                             None, "not_found" if exc.status_code == 404 else None))

    routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/health", self.health, methods=["GET"]),
              Route("/", self.page, methods=["GET"]),
              Mount("/page", StaticFiles(directory=PAGE_DIR), name="page")]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(workdir: str, stage: str | None = None, host: str = "127.0.0.1", port: int = 8000, slots: int = 4,
          max_images: int = 4, allow_local_files: bool = False) -> None:
  """Loads the workdir's model, compiles every program, then serves until SIGTERM / Ctrl-C."""
  import uvicorn  # pylint: disable=import-outside-toplevel

  from vlm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if slots < 1 or max_images < 0:
    raise InputError(f"Need --slots >= 1 and --max-images >= 0; got {slots} and {max_images}.")
  engine = Engine(*workdir_lib.load(workdir, stage), slots=slots, max_images=max_images)
  started = time.time()
  engine.warm_up()
  print(f"vlm-jax serve: compiled {engine.compiled_programs()} programs in {time.time() - started:.1f} s "
        f"(prompt buckets {list(engine.buckets)}, {slots} slots)", flush=True)
  model_id = os.path.basename(os.path.normpath(str(workdir)))
  server = ChatServer(engine, model_id, allow_local_files)
  print(f"vlm-jax serve: model '{model_id}' at http://{host}:{port}/ (chat page) and "
        f"http://{host}:{port}/v1 (OpenAI API)", flush=True)
  # uvicorn finishes the requests in flight on SIGTERM / SIGINT, then raises the signal again for the handler
  # it found: with these no-op ones the command returns (exit 0) once it has shut down cleanly.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.run(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)
  print("vlm-jax serve: stopped", flush=True)
