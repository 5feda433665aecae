"""`make_app(trained)`: the FastAPI app of `python -m decoder_jax.serve`.

  POST /v1/completions        prompt (string or list of strings) -> "text_completion"
  POST /v1/chat/completions   messages [{role, content}] -> "chat.completion"
  GET  /v1/models             the one model served
  GET  /health                the queue and the batching counters

Endpoints only check the request (protocol) and hand it to the batcher; `stream: true`
answers with server-sent events fed from the decode loop (streaming.TextStream). Every
error, from a bad field to a failed decode, is an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from decoder_jax import inference
from decoder_jax.errors import ConfigError, UserError
from decoder_jax.serving import engine, protocol
from decoder_jax.serving.batcher import Batcher, QueueFull
from decoder_jax.serving.protocol import ApiError
from decoder_jax.serving.streaming import TextStream

log = logging.getLogger(__name__)


def make_app(trained: inference.TrainedModel, *, model_name: str = "decoder_jax",
             max_batch: int = 8, max_queue: int = 64, batch_wait_ms: float = 5.0,
             max_new_tokens_limit: int | None = None) -> FastAPI:
  """The app serving `trained`. Its worker thread runs while the app does (lifespan);
  `app.state.batcher` is the Batcher (counters, `paused()` for tests).

  max_batch: prompts per decode call; max_queue: requests waiting before 429;
  batch_wait_ms: how long the worker waits for a batch to fill; max_new_tokens_limit:
  the most max_tokens a request may ask for (None: what the context leaves a 1-token
  prompt)."""
  room = trained.config.max_length - trained.config.prefix_length
  limit = room - 1 if max_new_tokens_limit is None else max_new_tokens_limit
  check_settings(max_batch, max_queue, batch_wait_ms, limit)
  if limit > room - 1:
    raise ConfigError(f"max_new_tokens_limit={limit} leaves no room for a prompt in the "
                      f"model's context ({room} tokens); at most {room - 1}")
  limits = protocol.Limits(max_tokens=limit, max_prompts=max_batch)
  batcher = Batcher(engine.make_decode(trained, max_batch), max_batch=max_batch,
                    max_queue=max_queue, wait_s=batch_wait_ms / 1000)
  end_ids = inference.end_ids(trained.tokenizer)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(_):
    batcher.start()
    try:
      yield
    finally:
      batcher.stop(timeout=5)

  app = FastAPI(title="decoder_jax", lifespan=lifespan)
  app.state.batcher = batcher

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):  # unknown path, wrong method
    return JSONResponse(protocol.error_body(str(e.detail), "invalid_request_error"),
                        status_code=e.status_code)

  @app.exception_handler(Exception)
  async def server_error(_, e: Exception):
    log.exception("request failed")
    return JSONResponse(protocol.error_body(f"internal error: {e}", "server_error"),
                        status_code=500)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, **batcher.stats()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": created, "owned_by": "decoder_jax"}]}

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await serve(protocol.parse_completion(await _json(request), trained, limits))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await serve(protocol.parse_chat(await _json(request), trained, limits))

  async def serve(job: protocol.Job):
    if not job.stream:
      results = await _outcome(asyncio.wrap_future(submit(job, None)))
      return JSONResponse(protocol.response_body(job, model_name, results))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # (row, token id), then None when done
    future = submit(job, lambda row, token: loop.call_soon_threadsafe(
        events.put_nowait, (row, token)))
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    return StreamingResponse(stream(job, future, events), media_type="text/event-stream")

  def submit(job: protocol.Job, on_token):
    try:
      return batcher.submit(engine.batch_key(job), job.prompts, job.seed, on_token)
    except QueueFull as e:
      raise ApiError(str(e), 429, kind="rate_limit_error", code="rate_limit_exceeded") from None

  async def stream(job: protocol.Job, future, events: asyncio.Queue):
    texts = [TextStream(trained.tokenizer, job.settings.stop, end_ids) for _ in job.prompts]
    if job.chat:
      yield protocol.sse(protocol.chunk(job, model_name, 0, "", role=True))
    while (event := await events.get()) is not None:
      row, token = event
      if text := texts[row].push(token):
        yield protocol.sse(protocol.chunk(job, model_name, row, text))
    try:
      results = await _outcome(asyncio.wrap_future(future))
    except ApiError as e:  # the status line went out already: the error is an event
      yield protocol.sse(e.body())
      return
    for row, (text, result) in enumerate(zip(texts, results)):
      rest = text.finish(result["text"])
      yield protocol.sse(protocol.chunk(job, model_name, row, rest or None,
                                        result["finish_reason"]))
    if job.include_usage:
      yield protocol.sse(protocol.usage_chunk(job, model_name, results))
    yield protocol.DONE

  return app


def check_settings(max_batch: int, max_queue: int, batch_wait_ms: float,
                   max_new_tokens_limit: int | None) -> None:
  """Raises ConfigError for server settings that cannot work, whatever the model."""
  if max_batch < 1:
    raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
  if max_queue < 1:
    raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
  if batch_wait_ms < 0:
    raise ConfigError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
  if max_new_tokens_limit is not None and max_new_tokens_limit < 1:
    raise ConfigError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")


async def _json(request: Request):
  raw = await request.body()
  try:
    return json.loads(raw)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
    raise ApiError(f"the request body is not valid JSON: {e}") from None


async def _outcome(future):
  """The decode results, or the ApiError a failed decode answers with."""
  try:
    return await future
  except UserError as e:  # a request the checks let through but the decode refused
    raise ApiError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  # the decode's bug, not the request's
    raise ApiError(f"decoding failed: {type(e).__name__}: {e}", 500, kind="server_error") from None
