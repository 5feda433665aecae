"""The OpenAI request and response shapes, without a web framework.

`parse_completion` and `parse_chat` check a request body field by field and turn it into
a `Job`: the prompts, and the `DecodeSettings` that a decode call shares (requests that
agree on them can be batched). Anything a client can get wrong ends in an `ApiError`
(HTTP 400 unless said otherwise) whose message names the field. The other functions
build response bodies and server-sent-event chunks from decode results
({"text", "tokens", "finish_reason"} per choice).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid

from decoder_jax import decoding, inference
from decoder_jax.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as in OpenAI's API

# OpenAI fields this server does not implement, with the values that mean "off" (null
# always does): a request asking for more is refused, not answered without it.
_OFF_COMMON = {"n": (1,), "logprobs": (False,), "logit_bias": ({},),
               "presence_penalty": (0,), "frequency_penalty": (0,)}
_OFF_COMPLETION = {**_OFF_COMMON, "best_of": (1,), "echo": (False,), "suffix": ("",)}
_OFF_CHAT = {**_OFF_COMMON, "top_logprobs": (0,), "tools": ([],), "functions": ([],),
             "tool_choice": ("none",), "response_format": ({"type": "text"},)}


class ApiError(Exception):
  """A request the server answers with an OpenAI-style error body."""

  def __init__(self, message: str, status: int = 400, *, kind: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.kind, self.param, self.code = status, kind, param, code

  def body(self) -> dict:
    return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """What one decode call shares; hashable, so it is the batching key."""
  sampler: object  # a decoding sampler (frozen dataclass)
  max_tokens: int
  stop: tuple[str, ...]
  chat: bool


@dataclasses.dataclass
class Job:
  """One request, checked: its prompts (one per choice) and how to decode them."""
  id: str
  created: int
  prompts: list  # str each, or for chat the conversation (a list of messages)
  prompt_tokens: list[int]  # the length of each prompt in tokens
  settings: DecodeSettings
  seed: int
  stream: bool
  include_usage: bool  # stream_options.include_usage: a last chunk with the usage

  @property
  def chat(self) -> bool:
    return self.settings.chat


@dataclasses.dataclass(frozen=True)
class Limits:
  max_tokens: int  # the most max_tokens a request may ask for
  max_prompts: int  # prompts per completions request (one batch holds them all)


def parse_completion(body, trained, limits: Limits) -> Job:
  """A /v1/completions body: prompt (a string or a list of strings), sampling fields."""
  body = _object(body)
  _refuse_unsupported(body, _OFF_COMPLETION)
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    prompts = list(prompt)
  else:
    raise ApiError("prompt must be a string or a non-empty list of strings (token ids are "
                   "not accepted)", param="prompt")
  if len(prompts) > limits.max_prompts:
    raise ApiError(f"at most {limits.max_prompts} prompts per request (the server's "
                   f"--max_batch), got {len(prompts)}", param="prompt")
  if any(not p for p in prompts):
    raise ApiError("prompt must not be empty", param="prompt")
  ids = [inference.encode_prompt(trained.tokenizer, p) for p in prompts]
  return _job("cmpl", body, prompts, ids, trained, limits, chat=False)


def parse_chat(body, trained, limits: Limits) -> Job:
  """A /v1/chat/completions body: messages [{role, content}], sampling fields."""
  body = _object(body)
  _refuse_unsupported(body, _OFF_CHAT)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError("messages must be a non-empty list of {role, content} objects",
                   param="messages")
  kept = []
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise ApiError(f"{where} must be an object with role and content", param="messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
      raise ApiError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                     param="messages")
    if not isinstance(content, str):
      raise ApiError(f"{where}.content must be a string", param="messages")
    kept.append({"role": role, "content": content})
  try:
    ids = inference.encode_chat(trained.tokenizer, kept)
  except UserError as e:  # no chat template, or the template refuses the conversation
    raise ApiError(str(e), param="messages") from None
  return _job("chatcmpl", body, [kept], [ids], trained, limits, chat=True)


def _job(prefix: str, body: dict, prompts: list, ids: list[list[int]], trained,
         limits: Limits, *, chat: bool) -> Job:
  """The sampling fields every endpoint shares, checked against the model and limits."""
  temperature = _number(body, "temperature", 1.0)
  top_p = _number(body, "top_p", 1.0)
  top_k = _integer(body, "top_k", None)
  try:
    sampler = decoding.make_sampler(temperature, top_k, top_p)
  except UserError as e:
    raise ApiError(str(e)) from None
  config = trained.config
  room = config.max_length - config.prefix_length
  longest = max(len(i) for i in ids)
  max_tokens = _integer(body, "max_tokens", None)
  if chat and max_tokens is None:
    max_tokens = _integer(body, "max_completion_tokens", None)
  if max_tokens is None:  # as much as the limit and the context leave
    max_tokens = max(1, min(limits.max_tokens, room - longest))
  elif not 1 <= max_tokens <= limits.max_tokens:
    raise ApiError(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}",
                   param="max_tokens")
  where = "messages" if chat else "prompt"
  # Served requests fit one window: a reply never loses the start of its prompt.
  if longest + max_tokens > room:
    raise ApiError(f"the prompt is {longest} tokens: with max_tokens={max_tokens} it does "
                   f"not fit the model's context ({room} tokens); shorten the prompt or ask "
                   "for fewer tokens", param=where, code="context_length_exceeded")
  try:
    inference.check_request(config, longest, max_tokens)
  except UserError as e:
    raise ApiError(str(e), param=where) from None
  stop = _stop(body)
  seed = _integer(body, "seed", None)
  stream = _boolean(body, "stream", False)
  options = body.get("stream_options")
  if options is not None and not isinstance(options, dict):
    raise ApiError("stream_options must be an object", param="stream_options")
  include_usage = _boolean(options or {}, "include_usage", False, "stream_options.")
  _string(body, "model")  # any name is served by the one model, but it must be a string
  return Job(
      id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), prompts=prompts,
      prompt_tokens=[len(i) for i in ids],
      settings=DecodeSettings(sampler, max_tokens, stop, chat),
      seed=secrets.randbelow(2**31) if seed is None else seed, stream=stream,
      include_usage=stream and include_usage)


def _object(body) -> dict:
  if not isinstance(body, dict):
    raise ApiError("the request body must be a JSON object")
  return body


def _refuse_unsupported(body: dict, off: dict) -> None:
  for name, neutral in off.items():
    value = body.get(name)
    if value is not None and not any(_same(value, v) for v in neutral):
      if name == "n" and isinstance(value, int) and not isinstance(value, bool):
        raise ApiError(f"n must be 1 (one choice per prompt), got {value}", param="n")
      raise ApiError(f"{name} is not supported by this server (got {value!r})", param=name)


def _same(value, neutral) -> bool:
  # 0.0 is 0, but true is not 1.
  return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _integer(body: dict, name: str, default, where: str = ""):
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise ApiError(f"{where}{name} must be an integer, got {value!r}", param=name)
  return value


def _number(body: dict, name: str, default: float) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ApiError(f"{name} must be a number, got {value!r}", param=name)
  return float(value)


def _boolean(body: dict, name: str, default: bool, where: str = "") -> bool:
  value = body.get(name)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ApiError(f"{where}{name} must be true or false, got {value!r}", param=name)
  return value


def _string(body: dict, name: str) -> str | None:
  value = body.get(name)
  if value is not None and not isinstance(value, str):
    raise ApiError(f"{name} must be a string, got {value!r}", param=name)
  return value


def _stop(body: dict) -> tuple[str, ...]:
  value = body.get("stop")
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise ApiError("stop must be a non-empty string or a list of them", param="stop")
  if len(stops) > MAX_STOP:
    raise ApiError(f"at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
  return tuple(dict.fromkeys(stops))  # in order, once each: equal lists batch together


def usage(job: Job, results: list[dict]) -> dict:
  prompt = sum(job.prompt_tokens)
  completion = sum(len(r["tokens"]) for r in results)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def response_body(job: Job, model: str, results: list[dict]) -> dict:
  """The whole reply: a "text_completion" or a "chat.completion"."""
  if job.chat:
    choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                "logprobs": None, "finish_reason": r["finish_reason"]}
               for i, r in enumerate(results)]
  else:
    choices = [{"index": i, "text": r["text"], "logprobs": None,
                "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
  return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion",
          "created": job.created, "model": model, "choices": choices,
          "usage": usage(job, results)}


def chunk(job: Job, model: str, index: int, text: str | None,
          finish_reason: str | None = None, role: bool = False) -> dict:
  """One streamed piece of choice `index`: `text` more of it (None: none), the
  finish_reason on its last piece; `role`: a chat stream's first piece."""
  if job.chat:
    delta = {"role": "assistant"} if role else {}
    if text is not None:
      delta["content"] = text
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
  else:
    choice = {"index": index, "text": text or "", "logprobs": None,
              "finish_reason": finish_reason}
  return {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
          "created": job.created, "model": model, "choices": [choice]}


def usage_chunk(job: Job, model: str, results: list[dict]) -> dict:
  """The last chunk of a stream asked for with stream_options.include_usage."""
  return {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
          "created": job.created, "model": model, "choices": [],
          "usage": usage(job, results)}


def sse(payload: dict) -> str:
  """One server-sent event."""
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
