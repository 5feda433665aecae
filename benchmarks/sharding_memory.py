"""Per-device memory of the training state (parameters + AdamW state) on data, fsdp and
tensor meshes, from XLA's compiled memory analysis of the real train step on 8 CPU devices
(nothing is allocated). The columns: benchmarks/README.md.

  python benchmarks/sharding_memory.py --models gpt2,smollm2 \\
      --meshes "data=8;fsdp=8;tensor=8;data=2,fsdp=4;fsdp=4,tensor=2" --batch 8 --seq_len 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import common  # benchmarks/common.py
from decoder_jax import peft
from decoder_jax.model import Decoder, ModelConfig, preset
from decoder_jax import sharding
from decoder_jax.train import config_sections, loop, setup, steps

NUM_DEVICES = 8
MIB = 2**20
COMMON = dict(scan_layers=True, attention_impl="xla", dtype="float32", param_dtype="float32")
MODELS = {  # name -> ModelConfig fields (the repo's presets where there is one)
    "gpt2": preset("gpt2-small", **COMMON).to_dict(),  # 12 x 768, 12 heads, vocab 50,304
    # SmolLM2-135M: 30 x 576, 9 query / 3 kv heads, SwiGLU 1536, vocab 49,152, tied
    "smollm2": preset("smollm2-135m", **COMMON).to_dict(),
    # For the test: some dimensions 8 does not divide (3 heads, vocab 100).
    "tiny": dict(family="gpt2", vocab_size=100, num_layers=2, num_heads=3, width=48,
                 max_length=64, **COMMON),
}


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}."""
  sizes = {axis: 1 for axis in sharding.MESH_AXES}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if axis.strip() not in sizes:
      raise SystemExit(f"mesh {text!r}: unknown axis {axis!r}, known {sharding.MESH_AXES}")
    sizes[axis.strip()] = int(size)
  return sizes


def nbytes(tree, shard=True) -> int:
  """Bytes of every leaf (ShapeDtypeStructs with NamedShardings), or of device 0's shards."""
  return sum(math.prod(x.sharding.shard_shape(x.shape) if shard else x.shape) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def dropped_axes(boxed_params, mesh) -> dict[str, list[str]]:
  """{"heads=12 over tensor=8": [param paths]}: the parameter dimensions whose mesh axis
  sharding._fit drops (the axis size does not divide them), so they stay whole."""
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  logical = nn.get_partition_spec(boxed_params)
  wanted = nn.logical_to_mesh(logical, sharding.LOGICAL_AXIS_RULES)
  found = {}
  for (path, names), spec, leaf in zip(
      jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0],
      jax.tree.leaves(wanted, is_leaf=is_spec), jax.tree.leaves(nn.unbox(boxed_params))):
    fitted = sharding._fit(spec, leaf.shape, mesh)  # pylint: disable=protected-access
    pad = (None,) * leaf.ndim
    for dim, name, want, got in zip(leaf.shape, tuple(names) + pad, tuple(spec) + pad, fitted):
      if want is not None and got is None:
        size = math.prod(mesh.shape[a] for a in ((want,) if isinstance(want, str) else want))
        found.setdefault(f"{name}={dim} over {want}={size}", []).append(
            "/".join(str(getattr(k, "key", k)) for k in path))
  return found


def measure(model_name: str, mesh_sizes: dict[str, int], batch: int, seq_len: int) -> dict:
  """One model on one mesh: the sharding-derived and XLA-reported bytes per device."""
  train_cfg = config_sections.train_section(batch_size=batch, num_steps=1000)
  model_config = ModelConfig.from_dict(config_sections.base_config(
      model=config_sections.model_section(**MODELS[model_name]), train=train_cfg).model.to_dict())
  mesh = sharding.make_mesh(mesh_sizes)
  loop.check_batch_layout(train_cfg, mesh)
  model = Decoder(model_config)
  # What setup.build_run builds, without its tokenizer and data.
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  run = setup.Run(model_config, model, None, None, seq_len,
                  peft.trainable_predicate(model_config), boxed["params"])
  abstract, state_sh, abstract_frozen, frozen_sh = setup.abstract_state(
      run, setup.make_optimizer(train_cfg, model_config), mesh, train_cfg.get("frozen_dtype"))
  batch_sh = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sh)
  abstract_batch = {"inputs": tokens, "targets": tokens}  # int32 [batch, seq_len] each
  train_step = jax.jit(steps.make_train_step(model, 1, dropout=False),
                       in_shardings=(state_sh, frozen_sh, batch_sh, None),
                       out_shardings=(state_sh, None), donate_argnums=0)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    compiled = train_step.lower(abstract, abstract_frozen, abstract_batch,
                                jax.eval_shape(lambda: jax.random.key(0))).compile()
  seconds, analysis = time.perf_counter() - start, compiled.memory_analysis()
  return dict(
      model=model_name, mesh=",".join(f"{a}={s}" for a, s in mesh_sizes.items() if s > 1)
      or "single", params=nbytes(abstract.params), opt=nbytes(abstract.opt_state),
      state=nbytes(abstract), state_global=nbytes(abstract, shard=False),
      whole=sum(nbytes(x, shard=False) for x in jax.tree.leaves(abstract)
                if x.sharding.is_fully_replicated),
      # No rng key bytes: without dropout the step never reads the key, which XLA prunes.
      xla_state=analysis.argument_size_in_bytes - nbytes(abstract_batch),
      temp=analysis.temp_size_in_bytes, alias=analysis.alias_size_in_bytes,
      output=analysis.output_size_in_bytes, compile_s=seconds,
      num_params=sum(x.size for x in jax.tree.leaves(abstract.params)),
      dropped=dropped_axes(boxed["params"], mesh))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="gpt2,smollm2", help=f"comma list of {list(MODELS)}")
  parser.add_argument("--meshes", default="data=8;fsdp=8;tensor=8;data=2,fsdp=4;fsdp=4,tensor=2",
                      help="';'-separated meshes, each 'axis=size,...' (sizes multiply to 8)")
  parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
  parser.add_argument("--seq_len", type=int, default=256)
  args = parser.parse_args(argv)
  sharding.split_host_cpu(NUM_DEVICES)  # before any use of the backend
  print(f"command: {common.command_line('sharding_memory.py', sys.argv[1:])}")
  print(f"machine: {common.cores()} cores ({common.cpu_name()}); jax {jax.__version__}, "
        f"backend {jax.default_backend()}, {jax.device_count()} devices; "
        f"batch {args.batch} x {args.seq_len} tokens; float32 params and AdamW moments\n")
  rows = []
  for name in filter(None, args.models.split(",")):
    if name not in MODELS:
      raise SystemExit(f"unknown model {name!r}; known {list(MODELS)}")
    for text in filter(None, args.meshes.split(";")):
      rows.append(measure(name, parse_mesh(text), args.batch, args.seq_len))
      print(f"  {name} {rows[-1]['mesh']}: compiled in {rows[-1]['compile_s']:.1f} s",
            file=sys.stderr, flush=True)
  print("MiB per device; state = params + opt state (+ scalar step counts)\n")
  mib = lambda r, *keys: [f"{r[k] / MIB:.2f}" for k in keys]  # noqa: E731
  print("\n".join(common.md_table(
      ["model", "mesh", "params", "opt state", "state (shardings)", "state (XLA)",
       "/ replicated", "whole", "temp", "alias", "compile s"],
      [[r["model"], r["mesh"], *mib(r, "params", "opt", "state", "xla_state"),
        f"{r['state'] / r['state_global']:.3f}", *mib(r, "whole", "temp", "alias"),
        f"{r['compile_s']:.1f}"] for r in rows], right=range(2, 11))))
  worst = max(abs(r["xla_state"] - r["state"]) for r in rows)
  print(f"\nXLA's state bytes minus the sharding-derived ones: at most {worst} bytes per device")
  for name in dict.fromkeys(r["model"] for r in rows):
    r = next(r for r in rows if r["model"] == name)
    print(f"- {name}: {r['num_params'] / 1e6:.1f}M params, {r['state_global'] / MIB:.1f} MiB "
          "of state when replicated")
  for r in rows:
    for what, paths in r["dropped"].items():
      print(f"- {r['model']} on {r['mesh']}: {what} does not divide, kept whole in "
            f"{len(paths)} params ({', '.join(p.removeprefix('blocks/') for p in paths)})")

if __name__ == "__main__":
  main()
