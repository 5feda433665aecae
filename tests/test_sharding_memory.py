"""benchmarks/sharding_memory.py on a tiny model: fsdp=8 holds 1/8 of the shardable state.

Each check runs in a fresh interpreter with 8 forced CPU devices: in this one, a training
test of the same worker may already have started JAX with the 2 devices of a CPU recipe.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

FSDP8 = """
import json, sharding_memory
r = sharding_memory.measure("tiny", sharding_memory.parse_mesh("fsdp=8"), batch=8, seq_len=16)
print(json.dumps({k: r[k] for k in ("whole", "state_global", "state", "xla_state", "params",
                                    "opt", "dropped")}))
"""

DROPPED = """
import json, jax, jax.numpy as jnp, sharding_memory
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import sharding
config = ModelConfig.from_dict(sharding_memory.MODELS["tiny"])  # 3 heads, vocab 100
boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
mesh = sharding.make_mesh(sharding_memory.parse_mesh("tensor=8"))
print(json.dumps(sharding_memory.dropped_axes(boxed["params"], mesh)))
"""


def run(script):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])}
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_fsdp8_state_is_an_eighth_plus_what_stays_whole():
  r = run(FSDP8)
  # Leaves without an embed axis (MLP and q/k/v biases, step counts) stay whole.
  assert 0 < r["whole"] < 0.05 * r["state_global"]
  expected = (r["state_global"] - r["whole"]) / 8 + r["whole"]
  assert abs(r["state"] - expected) <= 0.10 * expected  # from the shardings
  assert abs(r["xla_state"] - expected) <= 0.10 * expected  # XLA's argument bytes
  assert r["params"] + r["opt"] <= r["state"] <= r["params"] + r["opt"] + 64  # + scalars
  assert r["dropped"] == {}


def test_dimensions_a_mesh_axis_does_not_divide_are_reported():
  dropped = run(DROPPED)
  assert dropped["vocab=100 over tensor=8"] == ["embed/embedding"]
  assert "blocks/attn/query/kernel" in dropped["heads=3 over tensor=8"]
  assert "blocks/attn/key/kernel" in dropped["kv_heads=3 over tensor=8"]
  assert not any("mlp" in key for key in dropped)  # 192 divides by 8
