"""Fine-tuning end to end on a tiny model with SmolLM2's real tokenizer: LoRA and full
training through the loop, frozen weights, optimizer state, checkpoints, the
classification head, task metrics and the evaluate entry point."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import REPO
from decoder_jax import decoding, inference, peft
from decoder_jax.errors import ConfigError
from decoder_jax.evaluation import generation, metrics
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import losses, sharding
from decoder_jax.train import checkpoint, loop, state as state_lib, steps

from conftest import TINY_SMOL as TINY


# The runs below test checkpoints and restores, not sharding: one device compiles and runs
# several times faster than the 8 forced ones (tests/test_train.py covers the meshes).
def one_device():
  return jax.devices()[:1]


def sst2_config(task_data_dir, tmp_path, source, method, **train):
  sys.path.insert(0, str(REPO))
  os.environ["DECODER_JAX_DATA"] = str(task_data_dir)
  from configs import smollm2_sst2
  config = smollm2_sst2.get_config(f"{method},cpu")
  config.init_from = str(source)
  config.task.update(max_train_examples=64, max_eval_examples=48, max_length=48,
                     tfds_data_dir=str(tmp_path / "tfds"))
  config.train.update(dict(num_steps=4, batch_size=8, log_every=1, eval_every=2,
                           checkpoint_every=2, warmup_steps=1, **train))
  config.data.eval_batch_size = 16
  config.mesh.num_cpu_devices = None
  return config


def dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def test_lora_run_checkpoints_only_adapters_and_restores(task_data_dir, tmp_path, tiny_pretrained):
  full = sst2_config(task_data_dir, tmp_path, tiny_pretrained, "full")
  lora = sst2_config(task_data_dir, tmp_path, tiny_pretrained, "lora", learning_rate=1e-2)
  loop.train_and_evaluate(full, str(tmp_path / "full"), devices=one_device())
  result = loop.train_and_evaluate(lora, str(tmp_path / "lora"), devices=one_device())
  assert 0.0 <= result["eval/accuracy"] <= 1.0

  # The LoRA checkpoint: adapters and their optimizer moments only.
  manager = checkpoint.make_manager(str(tmp_path / "lora"), 1, 1, async_writes=False)
  saved = manager.item_metadata(4)["state"]
  saved = getattr(saved, "tree", saved)
  param_paths = traverse_util.flatten_dict(saved["params"])
  assert param_paths and all(p[-1] in ("lora_a", "lora_b") for p in param_paths)
  moments = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(saved["opt_state"])]
  assert moments and all("lora_a" in p or "lora_b" in p or "count" in p for p in moments), \
      [p for p in moments if "lora_" not in p][:5]
  manager.close()
  ratio = dir_bytes(tmp_path / "lora" / "checkpoints") / dir_bytes(tmp_path / "full" / "checkpoints")
  assert ratio < 0.1, ratio

  # Restoring (the base from init_from + the adapters from the checkpoint) gives the same
  # outputs the run measured at its last step.
  from decoder_jax.evaluation import finetuned as evaluate
  scored = evaluate.evaluate(lora, str(tmp_path / "lora"), weights="latest")
  logged = loop_metrics(tmp_path / "lora")[4]
  assert scored["loss"] == pytest.approx(logged["eval/loss"], abs=1e-5)
  assert scored["accuracy"] == pytest.approx(logged["eval/accuracy"])
  assert scored["examples"] == 48

  # The best checkpoint (by eval/accuracy, kept in workdir/best): its metrics are the ones
  # logged at the step best.json names.
  with open(tmp_path / "lora" / "best.json") as f:
    best = json.load(f)
  scored_best = evaluate.evaluate(lora, str(tmp_path / "lora"), weights="best")
  logged_best = loop_metrics(tmp_path / "lora")[best["step"]]
  assert scored_best["accuracy"] == pytest.approx(logged_best["eval/accuracy"]) == best["value"]
  assert scored_best["loss"] == pytest.approx(logged_best["eval/loss"], abs=1e-5)

  # `generate --workdir` of a LoRA run: the base from init_from, the adapters merged in.
  merged = inference.load_trained(str(tmp_path / "lora"))
  assert merged.config.lora is None and merged.step == 4
  run, params, _ = evaluate.load_finetuned(lora, str(tmp_path / "lora"), weights="latest")
  unmerged_logits = run.model.apply({"params": params}, jnp.arange(12)[None])[0]
  merged_logits = Decoder(merged.config).apply({"params": merged.params}, jnp.arange(12)[None])[0]
  np.testing.assert_allclose(merged_logits, unmerged_logits, atol=1e-4)


def loop_metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  return rows


@pytest.mark.parametrize("flat_allreduce", [False, True])
def test_lora_steps_leave_frozen_weights_bitwise_unchanged(smol_tokenizer, flat_allreduce):
  config = ModelConfig(**TINY, lora=dict(rank=4, alpha=8.0))
  model = Decoder(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  trainable, frozen = peft.split(params, lambda p, _: peft.is_lora_param(p))
  before = jax.tree.map(np.array, frozen)
  tx = optax.adamw(1e-2)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), tx=tx)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 1000, (4, 17)).astype(np.int32)
  weights = np.ones((4, 16), np.float32)
  weights[:, :8] = 0.0  # a prompt
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  # flat_allreduce: the batch's rows on 2 devices, the adapters' gradients summed flat.
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  step = jax.jit(steps.make_train_step(model, 1, dropout=False,
                                       flat_allreduce_mesh=mesh if flat_allreduce else None))
  losses = []
  for _ in range(5):
    state, m = step(state, frozen, batch, jax.random.key(1))
    losses.append(float(m["loss"]))
  after = jax.tree.map(np.array, frozen)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  assert losses[-1] < losses[0]
  # Adam's moments have exactly the trainable leaves.
  mu = state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  assert not np.allclose(np.asarray(jax.tree.leaves(state.params["block_0"]["attn"]["query"])[1]), 0)


def test_prompt_tokens_do_not_move_the_loss():
  """Targets under weight 0 (the prompt) have no effect on the loss or its gradient."""
  config = ModelConfig(**{**TINY, "vocab_size": 64})
  model = Decoder(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 64, (2, 12)).astype(np.int32),
           "targets": rng.integers(0, 64, (2, 12)).astype(np.int32),
           "weights": np.concatenate([np.zeros((2, 5)), np.ones((2, 7))], 1).astype(np.float32)}
  other = dict(batch, targets=batch["targets"].copy())
  other["targets"][:, :5] = (other["targets"][:, :5] + 1) % 64  # change prompt targets only
  loss = lambda p, b: jnp.divide(*losses.loss_sums(model, p, b))  # noqa: E731
  assert float(loss(params, batch)) == pytest.approx(float(loss(params, other)), abs=1e-7)
  g1, g2 = jax.grad(loss)(params, batch), jax.grad(loss)(params, other)
  assert all(np.allclose(a, b, atol=1e-7) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))


def test_classification_head_learns_a_separable_task():
  """Label = whether token 3 occurs before each row's last_index: the head must find it."""
  config = ModelConfig(**{**TINY, "vocab_size": 16, "max_length": 16})
  model = Decoder(config, num_labels=2)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  assert params["cls_head"]["kernel"].shape == (32, 2)

  def make(seed, n=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 16, (n, 12)).astype(np.int32)
    last = rng.integers(5, 12, n).astype(np.int32)
    labels = rng.integers(0, 2, n).astype(np.int32)
    where = rng.integers(0, 5, n)
    tokens[np.arange(n), where] = np.where(labels == 1, 3, tokens[np.arange(n), where])
    return {"inputs": tokens, "last_index": last, "labels": labels,
            "weights": np.ones(n, np.float32)}

  tx = optax.adam(3e-3)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), tx=tx)
  step = jax.jit(steps.make_train_step(model, 1, dropout=False))
  for i in range(150):
    state, _ = step(state, {}, make(i), jax.random.key(0))
  test = make(10_000, 256)
  logits = losses.class_logits(model, state.params, test)
  accuracy = float((np.argmax(np.asarray(logits), -1) == test["labels"]).mean())
  assert accuracy > 0.95, accuracy


def test_bleu_is_sacrebleu_corpus_bleu():
  import sacrebleu
  hyps = ["un chat est assis sur le tapis .", "deux hommes jouent au football"]
  refs = ["un chat est assis sur le tapis .", "deux hommes jouent au soccer dehors"]
  assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert metrics.bleu(hyps[:1], refs[:1]) == pytest.approx(100.0)
  assert metrics.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
  # Class 0: P=1, R=1/2 -> F1 2/3; class 1: P=2/3, R=1 -> F1 0.8.
  assert metrics.macro_f1([1, 0, 1, 1], [1, 0, 0, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    metrics.bleu(hyps, refs[:1])


def test_eval_generation_matches_the_generation_engine(smol_tokenizer):
  config = ModelConfig(**TINY)
  params = nn.unbox(Decoder(config).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  trained = inference.TrainedModel(config, params, smol_tokenizer)
  prompts = ["A man rides a bike.", "Two dogs play in the snow near a tree.", "Hi"]
  ids = [smol_tokenizer.encode(p) for p in prompts]
  texts = generation.generate_texts(trained, ids, max_new_tokens=6, batch_size=2)
  reference = inference.generate_batch(trained, prompts, max_new_tokens=6,
                                       sampler=decoding.Greedy())
  expected = [smol_tokenizer.decode(r["samples"][0]["tokens"], skip_special_tokens=True).strip()
              for r in reference]
  assert texts == expected


def test_lora_target_matching_nothing_fails_before_training(task_data_dir, tmp_path, tiny_pretrained):
  config = sst2_config(task_data_dir, tmp_path, tiny_pretrained, "lora")
  config.model.lora.targets = ("attn/.*", "no_such_layer")
  with pytest.raises(ValueError, match="no_such_layer"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")
  config.model.lora.targets = ("attn/.*",)
  config.model.lora.rank = 64  # larger than width 32
  with pytest.raises(ValueError, match="rank=64 exceeds"):
    loop.train_and_evaluate(config, str(tmp_path / "w2"))


def test_evaluate_cli_zero_shot_on_a_tsv_file(task_data_dir, tmp_path, tiny_pretrained):
  tsv = tmp_path / "few.tsv"
  lines = (task_data_dir / "sst2" / "dev.tsv").read_text().splitlines()[:21]
  tsv.write_text("\n".join(lines) + "\n")
  args = [sys.executable, "-m", "decoder_jax.evaluate", "--config=configs/smollm2_sst2.py:lora,cpu",
          f"--config.init_from={tiny_pretrained}", f"--config.task.tfds_data_dir={tmp_path / 'tfds'}",
          "--config.task.max_train_examples=32", "--config.task.max_eval_examples=16",
          "--config.mesh.num_cpu_devices=1", "--zero_shot", f"--tsv_file={tsv}"]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO),
         "DECODER_JAX_DATA": str(task_data_dir)}
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["examples"] == 20 and result["examples_from"] == str(tsv)
  assert 0.0 <= result["accuracy"] <= 1.0 and result["weights"].startswith("zero-shot")


def test_bfloat16_params_keep_their_dtype_through_steps():
  """Gradients come back in the params' dtype, so the optimizer state (and the compiled
  step's input types) stay the same after the first step."""
  config = ModelConfig(**{**TINY, "vocab_size": 64, "dtype": "bfloat16",
                          "param_dtype": "bfloat16"})
  model = Decoder(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tx = optax.adamw(1e-3)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), tx=tx)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = jax.jit(steps.make_train_step(model, 1, dropout=False), donate_argnums=0)
  for _ in range(2):
    state, _ = step(state, {}, batch, jax.random.key(0))
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state[0].mu))}
  assert dtypes == {jnp.dtype("bfloat16")}
  assert step._cache_size() == 1


@pytest.mark.parametrize("method", ["adalora", "prefix"])
def test_peft_run_checkpoints_only_its_parameters_and_restores(method, task_data_dir, tmp_path,
                                                               tiny_pretrained):
  """AdaLoRA (its allocator's state in the optimizer state) and prefix tuning (its prefix
  initialised from the base, its MLP folded away for decoding) through the loop, the
  checkpoint, evaluate and generate's loading."""
  config = sst2_config(task_data_dir, tmp_path, tiny_pretrained, method, learning_rate=1e-2)
  if method == "adalora":
    config.model.adalora.update(init_rank=6, target_rank=4, t_init=1, t_final=1, delta_t=1)
  workdir = str(tmp_path / method)
  loop.train_and_evaluate(config, workdir, devices=one_device())
  manager = checkpoint.make_manager(workdir, 1, 1, async_writes=False)
  saved = manager.item_metadata(4)["state"]
  saved = getattr(saved, "tree", saved)
  names = {p[-1] if method == "adalora" else p[0]
           for p in traverse_util.flatten_dict(saved["params"])}
  assert names == ({"adalora_p", "adalora_e", "adalora_q"} if method == "adalora"
                   else {"prefix"})
  manager.close()

  from decoder_jax.evaluation import finetuned as evaluate
  scored = evaluate.evaluate(config, workdir, weights="latest")
  assert scored["loss"] == pytest.approx(loop_metrics(workdir)[4]["eval/loss"], abs=1e-5)
  loaded = inference.load_trained(workdir)
  assert loaded.config.peft_method == (None if method == "adalora" else "prefix")
  run, params, _ = evaluate.load_finetuned(config, workdir, weights="latest")
  tokens = jnp.arange(12)[None]
  np.testing.assert_allclose(
      Decoder(loaded.config).apply({"params": loaded.params}, tokens)[0],
      run.model.apply({"params": params}, tokens)[0], atol=1e-4)
  if method == "adalora":  # t_final=1: the last step pruned to the target budget
    assert peft.adalora.live_singular_values(params) == (
        config.model.adalora.target_rank * peft.adalora.num_triplets(run.model_config))


@pytest.mark.parametrize("method, fields, message", [
    ("prompt", dict(length=250), r"model.prompt.length=250 plus the sequence length \(48\) "
                                 r"exceeds the model's context \(max_length=256\)"),
    ("adalora", dict(init_rank=4, target_rank=6), r"target_rank=6 exceeds init_rank=4"),
    ("adalora", dict(init_rank=4, target_rank=2, targets=("attn/.*", "ffn/up")),
     r"pattern 'ffn/up' matches no Dense module"),
    ("adalora", dict(init_rank=4, target_rank=2, t_init=3, t_final=1),
     r"t_init \(3\) \+ t_final \(1\) must be below train.num_steps \(4\)"),
    ("adapter", dict(size=0), r"model.adapter.size must be an integer >= 1"),
])
def test_bad_method_settings_fail_before_anything_is_written(method, fields, message,
                                                             task_data_dir, tmp_path,
                                                             tiny_pretrained):
  config = sst2_config(task_data_dir, tmp_path, tiny_pretrained, method)
  getattr(config.model, method).update(fields)
  with pytest.raises(ConfigError, match=message):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("name", ["smollm2_sst2", "smollm2_multi30k", "smollm2_chat"])
def test_task_configs_take_every_method(name):
  import importlib

  sys.path.insert(0, str(REPO))
  module = importlib.import_module(f"configs.{name}")
  from decoder_jax.model.config import PEFT_METHODS
  from decoder_jax.train import config_sections
  for method in config_sections.FINETUNE_METHODS:
    for arg in (method, f"{method},cpu"):
      config = module.get_config(arg)
      chosen = [m for m in PEFT_METHODS if config.model.get(m) is not None]
      assert chosen == ([] if method == "full" else [method]), (arg, chosen)
      # The section builds the method's config (every field known, values valid).
      ModelConfig.from_dict({**ModelConfig().to_dict(), **{
          m: config.model[m].to_dict() for m in chosen}})
  with pytest.raises(ConfigError, match="give one of full, lora, adalora"):
    module.get_config("loar,cpu")
