"""tools/gpu_checks.py: the kit's package list and the acceptance table's verdicts."""

import importlib.metadata as metadata
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import gpu_checks  # noqa: E402  pylint: disable=wrong-import-position


def _all_requirements():
  """Every distribution decoder_jax needs, by the same walk with nothing installed there."""
  return gpu_checks.missing_distributions("decoder_jax", set())


def test_kit_holds_exactly_what_the_gpu_machine_lacks():
  everything = _all_requirements()
  assert {"jax", "flax", "ml-collections", "grain"} <= set(everything)
  assert everything["jax"] == metadata.version("jax")  # the versions tested here
  # A machine with all but ml-collections (and what only it needs) gets just that.
  only_ml = {"ml-collections"} | {
      d for d in gpu_checks.missing_distributions("ml-collections", set())}
  have = set(everything) - only_ml
  assert set(gpu_checks.missing_distributions("decoder_jax", have)) == only_ml


def test_a_version_outside_decoder_jaxs_range_is_carried_too(tmp_path):
  everything = _all_requirements()
  (tmp_path / "freeze.txt").write_text("".join(
      f"{name}=={'0.11.0' if name == 'flax' else version}\n"
      for name, version in everything.items()))
  have = gpu_checks.read_have(str(tmp_path / "freeze.txt"))
  assert have["flax"] == "0.11.0"  # setup.cfg asks flax>=0.12
  assert gpu_checks.missing_distributions("decoder_jax", have) == {
      "flax": metadata.version("flax")}
  # `pip list` columns and bare names read the same way.
  (tmp_path / "list.txt").write_text(
      "Package Version\n------- -------\nJAX 0.11.2\nml_collections\n")
  assert gpu_checks.read_have(str(tmp_path / "list.txt")) == {"jax": "0.11.2",
                                                             "ml-collections": None}


def test_recipe_losses_reads_final_and_best(tmp_path):
  rows = [{"step": 100, "train/loss": 2.0}, {"step": 250, "eval/loss": 1.9},
          {"step": 500, "eval/loss": 1.7}, {"step": 750, "eval/loss": 1.75}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert gpu_checks.recipe_losses(str(tmp_path)) == (1.75, 1.7, 750)
  assert gpu_checks.recipe_losses(str(tmp_path / "missing")) == (None, None, 0)


def _speed(jax_tok, hf_tok, **jax_extra):
  side = lambda tok, **kw: {"tok_per_s": tok, **kw}
  return {"models": {m: {"by_side": {"jax": side(jax_tok, **jax_extra), "hf": side(hf_tok)}}
                     for m in ("gpt2", "smollm2")}}


def test_verdicts_follow_the_targets():
  R = gpu_checks.StageResult
  results = {
      "speed": R("speed", "ok", 1, _speed(600_000, 480_000)),  # 1.25x: gpt2 met, smollm2 not
      "bf16_f32": R("bf16_f32", "ok", 1, {"bfloat16": dict(final=1.480, best=1.47,
                                                           last_eval_step=5000),
                                          "float32": dict(final=1.465, best=1.46,
                                                          last_eval_step=5000)}),
      "llama1b": R("llama1b", "ok", 1, {"models": {"llama1b": {"by_side": {
          "jax": {"tok_per_s": 1.0, "mfu": 0.50}}}}}),
      "max_batch": R("max_batch", "ok", 1, {"searches": {"gpt2": {"jax": {"max": 96},
                                                                  "hf": {"max": 64}}}}),
  }
  rows = {row[0]: row for row in gpu_checks.acceptance_rows(results)}
  assert rows["gpt2: decoder_jax / HF tokens/s"][3] == "met"
  assert rows["smollm2: decoder_jax / HF tokens/s"][3] == "NOT met"
  assert rows["llama1b: decoder_jax MFU"][3] == "NOT met"
  assert rows["shakespeare GPU recipe: |eval/loss bf16 - float32|"][3] == "met"  # 0.015
  assert rows["gpt2 seq 1024: largest batch that trains, decoder_jax vs HF"][3] == "met"
  # Off a GPU (or on smoke shapes) nothing is called met.
  off = gpu_checks.acceptance_rows(results, "not a GPU run")
  assert not any(row[3] in ("met", "NOT met") for row in off)


def test_unfinished_stages_say_so():
  R = gpu_checks.StageResult
  results = {"speed": R("speed", "killed at 280 s", 280, {}),
             "bf16_f32": R("bf16_f32", "float32 killed at 150 s", 150, {
                 "bfloat16": dict(final=1.48, best=1.47, last_eval_step=5000),
                 "float32": dict(final=1.60, best=1.60, last_eval_step=3000)})}
  rows = {row[0]: row for row in gpu_checks.acceptance_rows(results)}
  assert rows["gpt2: decoder_jax / HF tokens/s"][1:] == ["not measured", ">= 1.2x",
                                                         "killed at 280 s"]
  assert rows["shakespeare GPU recipe: |eval/loss bf16 - float32|"][3].startswith("incomplete")
  assert rows["llama1b: decoder_jax MFU"][3] == "not run"


def test_unknown_stage_is_refused(tmp_path):
  with pytest.raises(SystemExit, match="unknown stages"):
    gpu_checks.main(["run", "--kit", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--stages", "speed,nope"])
  with pytest.raises(SystemExit, match="gpu_checks.py prepare"):  # no kit: no data
    gpu_checks.main(["run", "--kit", str(tmp_path), "--out", str(tmp_path / "o")])
  assert not (tmp_path / "o").exists()  # refused before anything was written
