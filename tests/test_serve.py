"""python -m decoder_jax.serve: the real server (uvicorn in a thread) on the tiny pretrained
model, talked to with the official openai client: replies equal offline decoding,
concurrent requests share a decode call, streams add up to the reply, bad requests get
400, a full queue 429, a failed decode 500, and the server keeps serving after each."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import REPO  # noqa: E402
from decoder_jax import decoding, inference  # noqa: E402
from decoder_jax.serving import app as app_lib  # noqa: E402
from decoder_jax.serving.batcher import Batcher  # noqa: E402
from decoder_jax.serving.streaming import TextStream  # noqa: E402

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Hello"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
]


@pytest.fixture(scope="module")
def trained(tiny_pretrained):
  from decoder_jax import pretrained
  return pretrained.load_pretrained(str(tiny_pretrained))


@pytest.fixture(scope="module")
def server(trained):
  """(base url, app) of a server with room for 4 waiting requests and 4 prompts a call."""
  app = app_lib.make_app(trained, model_name="tiny", max_batch=4, max_queue=4,
                         batch_wait_ms=20, max_new_tokens_limit=64)
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not uv.started:
    assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
    time.sleep(0.05)
  yield f"http://127.0.0.1:{listener.getsockname()[1]}", app
  uv.should_exit = True
  thread.join(10)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(trained):
  """Greedy replies of inference.generate_batch: (completions, chat replies)."""
  run = lambda prompts, chat: inference.generate_batch(  # noqa: E731
      trained, prompts, max_new_tokens=MAX_TOKENS, sampler=decoding.Greedy(), chat=chat)
  return ([r["samples"][0] for r in run(PROMPTS, False)],
          [r["samples"][0] for r in run(CONVERSATIONS, True)])


def post(base: str, path: str, body: bytes | dict) -> tuple[int, dict]:
  """(status, JSON body) of a raw POST: for bodies the openai client would not send."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(base + path, data=data,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def concurrently(batcher, calls: list):
  """Runs `calls` in threads, queued while the worker is held so that they meet in the
  queue; their results in order."""
  with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
    with batcher.paused():
      futures = [pool.submit(call) for call in calls]
      batcher.wait_queued(len(calls))
    return [f.result() for f in futures]


def test_concurrent_completions_share_one_call_and_a_full_queue_gets_429(server, client,
                                                                          offline):
  base, app = server
  batcher = app.state.batcher
  calls_before = batcher.decode_calls
  create = lambda prompt: client.completions.create(  # noqa: E731
      model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    with batcher.paused():
      futures = [pool.submit(create, p) for p in PROMPTS]
      batcher.wait_queued(len(PROMPTS))
      with pytest.raises(openai.RateLimitError) as full:  # max_queue=4 are waiting
        create("one too many")
      assert full.value.status_code == 429 and "max_queue" in full.value.message
    replies = [f.result() for f in futures]
  for reply, sample in zip(replies, offline[0]):
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.choices[0].text == sample["text"]
    assert reply.choices[0].finish_reason == sample["finish_reason"]
    assert reply.usage.completion_tokens == len(sample["tokens"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(sample["tokens"])
  assert batcher.decode_calls - calls_before == 1  # four requests, one decode call
  health = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())
  assert health["status"] == "ok" and health["batch_sizes"][-1] == len(PROMPTS)
  assert health["queued"] == 0


def test_concurrent_chat_completions_match_offline(server, client, offline):
  batcher = server[1].state.batcher
  calls_before = batcher.decode_calls
  replies = concurrently(batcher, [
      lambda m=m: client.chat.completions.create(model="tiny", messages=m, temperature=0,
                                                 max_tokens=MAX_TOKENS)
      for m in CONVERSATIONS])
  assert batcher.decode_calls - calls_before == 1
  for reply, sample in zip(replies, offline[1]):
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == sample["text"]
    assert reply.choices[0].finish_reason == sample["finish_reason"]


def test_streams_add_up_to_the_reply(client, offline):
  stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True})
  chunks = list(stream)
  assert all(c.object == "text_completion" for c in chunks)
  texts = [c.choices[0].text for c in chunks if c.choices]
  assert "".join(texts) == offline[0][0]["text"]
  assert len([t for t in texts if t]) > 1  # token by token, not all at the end
  finished = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finished[-1] == offline[0][0]["finish_reason"] and not any(finished[:-1])
  assert chunks[-1].usage.completion_tokens == len(offline[0][0]["tokens"])

  stream = client.chat.completions.create(model="tiny", messages=CONVERSATIONS[0],
                                          max_tokens=MAX_TOKENS, temperature=0, stream=True)
  chunks = list(stream)
  assert chunks[0].object == "chat.completion.chunk"
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline[1][0]["text"]
  assert chunks[-1].choices[0].finish_reason == offline[1][0]["finish_reason"]


def test_sampled_replies_follow_their_own_seed(trained, client, server):
  asks = [(PROMPTS[0], 5), (PROMPTS[3], 6)]
  replies = concurrently(server[1].state.batcher, [
      lambda p=p, s=s: client.completions.create(model="tiny", prompt=p, seed=s,
                                                 max_tokens=MAX_TOKENS, temperature=1.0)
      for p, s in asks])
  # Offline in the other order: each row's sample depends on its seed, not its place.
  alone = inference.generate_batch(trained, [p for p, _ in asks[::-1]], seed=[5, 6][::-1],
                                   max_new_tokens=MAX_TOKENS, sampler=decoding.Temperature(1.0))
  assert [r.choices[0].text for r in replies] == [a["samples"][0]["text"] for a in alone[::-1]]


def test_stop_strings_across_tokens_cut_streamed_and_whole_replies_alike(trained, client,
                                                                         server, offline):
  sample = offline[0][1]
  first, second = (trained.tokenizer.decode([t]) for t in sample["tokens"][:2])
  stop = first[-1] + second[:2]  # starts in one token, ends in the next
  expected = sample["text"][:sample["text"].index(stop)]
  ask = lambda stream: client.completions.create(  # noqa: E731
      model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop],
      stream=stream)
  whole, streamed = concurrently(server[1].state.batcher, [lambda: ask(False),
                                                           lambda: list(ask(True))])
  assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
  assert "".join(c.choices[0].text for c in streamed) == expected
  assert streamed[-1].choices[0].finish_reason == "stop"


def test_the_batcher_groups_equal_settings_oldest_first_within_max_batch():
  calls = []
  batcher = Batcher(lambda key, rows, seeds, on_token: calls.append((key, rows)) or rows,
                    max_batch=3, max_queue=8, wait_s=0)
  batcher.start()
  try:
    with batcher.paused():
      futures = [batcher.submit(key, rows, seed=0) for key, rows in
                 [("a", [1]), ("b", [2]), ("a", [3, 4]), ("a", [5]), ("b", [6])]]
    assert [f.result(timeout=10) for f in futures] == [[1], [2], [3, 4], [5], [6]]
  finally:
    batcher.stop()
  # The oldest request's settings first; [5] waits for the next "a" call: 3 rows at most.
  assert calls == [("a", [1, 3, 4]), ("b", [2, 6]), ("a", [5])]


def test_text_stream_holds_back_half_characters_and_stop_string_starts(trained):
  tokenizer = trained.tokenizer
  text = "Tea 🍵 or coffee ☕? Say STOP when done."
  ids = tokenizer.encode(text, add_special_tokens=False)
  for stop, final in [((), text), (("STOP",), text[:text.index("STOP")])]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert final.startswith("".join(deltas))
    assert "".join(deltas) + stream.finish(final) == final
  assert len([i for i in ids if tokenizer.decode([i]).endswith("\ufffd")]) > 1  # the point


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_k": 0}, "top_k"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 65}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens must be an integer"),
    ({"prompt": "hi", "stop": 3}, "stop"),
    ({"prompt": "hi", "n": 2}, "n must be 1"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": ""}, "empty"),
    ({"prompt": 5}, "prompt must be"),
    ({"prompt": "hello " * 250, "max_tokens": 8}, "does not fit"),
])
def test_bad_completion_requests_get_400(server, body, message):
  status, reply = post(server[0], "/v1/completions", body)
  assert status == 400, reply
  assert reply["error"]["type"] == "invalid_request_error"
  assert message in reply["error"]["message"]


@pytest.mark.parametrize("messages, message", [
    ([], "messages must be"),
    ([{"role": "wizard", "content": "hi"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    (["hi"], "must be an object"),
])
def test_bad_chat_requests_get_400(server, messages, message):
  status, reply = post(server[0], "/v1/chat/completions", {"messages": messages})
  assert status == 400 and message in reply["error"]["message"]


def test_the_client_sees_400_and_the_server_still_answers(client, offline):
  with pytest.raises(openai.BadRequestError, match="temperature"):
    client.completions.create(model="tiny", prompt="hi", temperature=-0.5)
  reply = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                    temperature=0)
  assert reply.choices[0].text == offline[0][0]["text"]
  assert [m.id for m in client.models.list().data] == ["tiny"]


def test_a_failed_decode_answers_500_and_the_server_goes_on(client, offline, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("the accelerator caught fire")

  monkeypatch.setattr(inference, "generate_batch", broken)
  with pytest.raises(openai.InternalServerError, match="caught fire"):
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                              temperature=0)
  monkeypatch.undo()
  reply = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                    temperature=0)
  assert reply.choices[0].text == offline[0][0]["text"]


def test_unknown_paths_get_an_error_body(server):
  status, reply = post(server[0], "/v1/embeddings", {"input": "hi"})
  assert status == 404 and reply["error"]["message"]


def test_the_command_serves_and_ends_user_errors_in_one_line(tiny_pretrained):
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  env.pop("DECODER_JAX_DEBUG", None)
  command = [sys.executable, "-m", "decoder_jax.serve", f"--pretrained={tiny_pretrained}"]
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen()
  start = lambda *flags: subprocess.Popen(  # noqa: E731
      command + list(flags), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
  serving = start("--port=0", "--model_name=tiny-cli")
  refused = [(start("--max_batch=0"), 2, "error: max_batch must be >= 1"),
             (start(f"--port={taken.getsockname()[1]}"), 1, "error: cannot listen on")]
  try:
    for line in serving.stderr:  # the log names the port it took
      if found := re.search(r"serving tiny-cli on (http://\S+)/v1", line):
        break
    assert found, "the server ended without serving"
    health = json.loads(urllib.request.urlopen(found[1] + "/health", timeout=30).read())
    assert health["model"] == "tiny-cli" and health["max_batch"] == 8
  finally:
    serving.terminate()
    serving.wait(30)
  for process, status, message in refused:
    err = process.communicate(timeout=120)[1]
    assert process.returncode == status and err.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in err
  taken.close()
