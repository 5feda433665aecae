"""PyTorch reference for the shakespeare-char CPU recipe (eager mode).

A small character-level GPT-2-style decoder and training loop, written for this
repository, that follows the recipe nanoGPT's README gives for training on a CPU:

  data      tiny shakespeare, char vocab = sorted(set(text)) (65 symbols),
            train = text[:int(0.9 * n)], val = the rest; training batches are
            random windows (uniform start offsets o in [0, len(train) - 64)),
            inputs tokens[o:o+64], targets tokens[o+1:o+65].
  model     4 layers, 4 heads, width 128, context 64, no biases anywhere
            (LayerNorm has a weight only), learned positions, pre-LN, GELU MLP
            (4x), final LayerNorm, output head tied to the token embedding,
            dropout 0. Init N(0, 0.02) for linears and embeddings; attention
            output and MLP down projections N(0, 0.02 / sqrt(2 * n_layer)).
            Attention: F.scaled_dot_product_attention(is_causal=True).
  optimizer AdamW(lr 1e-3, betas (0.9, 0.99), eps 1e-8), weight decay 0.1 on
            parameters with ndim >= 2 (linears and both embeddings), none on
            LayerNorm weights; gradient-norm clip 1.0; batch 12; 2000 steps.
  schedule  step index it = 0..steps-1:
              it <  100:   lr = 1e-3 * (it + 1) / (100 + 1)       (linear warmup)
              it >= 100:   r  = (it - 100) / (2000 - 100)
                           lr = 1e-4 + 0.5 * (1 + cos(pi * r)) * (1e-3 - 1e-4)
            i.e. cosine from 1e-3 down to 1e-4 at step 2000 (nanoGPT's rule).
            With --steps other than 2000 the decay end moves with it.
  eval      loss = mean token cross-entropy over a fixed set of --eval_windows
            (default 500) validation windows of 64 tokens, start offsets drawn
            once from a generator seeded with --eval_seed (default 0), the same
            windows every time. Evaluated after every --eval_interval steps
            (default 250) and always after the last step; the last one is the
            final validation loss. --eval_interval 0 evaluates only at the end.

Prints a progress line per evaluation and, as the very last stdout line, one
JSON object: {"final_val_loss", "train_seconds", "eval_seconds", "steps", ...}.
train_seconds counts only the training steps (no evaluation, no setup).

Run:  python benchmarks/torch_reference_shakespeare.py \
          --data /path/to/tiny_shakespeare/input.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Recipe constants (nanoGPT README, shakespeare-char on CPU).
N_LAYER = 4
N_HEAD = 4
N_EMBD = 128
BLOCK_SIZE = 64
BATCH_SIZE = 12
LEARNING_RATE = 1e-3
MIN_LR = 1e-4
WARMUP_STEPS = 100
BETAS = (0.9, 0.99)
EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
INIT_STD = 0.02


def _default_data_path() -> str:
  root = os.environ.get("DECODER_JAX_DATA")
  if not root:
    # Repository layout on development machines: <repo>/../shared/data.
    root = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
  return os.path.join(root, "tiny_shakespeare", "input.txt")


# ----------------------------------------------------------------------------
# Model


class LayerNorm(nn.Module):
  """LayerNorm with a learned scale and no bias."""

  def __init__(self, dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class SelfAttention(nn.Module):

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.out = nn.Linear(dim, dim, bias=False)

  def forward(self, x):
    b, t, d = x.shape  # [batch, length, embed]
    q, k, v = self.qkv(x).split(d, dim=-1)
    # [batch, heads, length, head_dim]
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
               for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.up = nn.Linear(dim, 4 * dim, bias=False)
    self.down = nn.Linear(4 * dim, dim, bias=False)

  def forward(self, x):
    return self.down(F.gelu(self.up(x)))


class Block(nn.Module):

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.ln1 = LayerNorm(dim)
    self.attn = SelfAttention(dim, heads)
    self.ln2 = LayerNorm(dim)
    self.mlp = MLP(dim)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):

  def __init__(self, vocab: int, n_layer: int, n_head: int, dim: int,
               block_size: int):
    super().__init__()
    self.tok = nn.Embedding(vocab, dim)
    self.pos = nn.Embedding(block_size, dim)
    self.blocks = nn.ModuleList(Block(dim, n_head) for _ in range(n_layer))
    self.ln_f = LayerNorm(dim)
    self._init(n_layer)

  def _init(self, n_layer: int):
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
    resid_std = INIT_STD / math.sqrt(2 * n_layer)
    for blk in self.blocks:
      nn.init.normal_(blk.attn.out.weight, mean=0.0, std=resid_std)
      nn.init.normal_(blk.mlp.down.weight, mean=0.0, std=resid_std)

  def forward(self, idx):
    t = idx.shape[1]  # idx: [batch, length]
    x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
    for blk in self.blocks:
      x = blk(x)
    x = self.ln_f(x)
    return x @ self.tok.weight.t()  # tied head: [batch, length, vocab]


def loss_fn(model, x, y):
  logits = model(x)
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ----------------------------------------------------------------------------
# Data, schedule, evaluation


def load_tokens(path: str):
  with open(path, "r", encoding="utf-8") as f:
    text = f.read()
  chars = sorted(set(text))
  stoi = {c: i for i, c in enumerate(chars)}
  tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
  n_train = int(len(tokens) * 0.9)
  return tokens[:n_train], tokens[n_train:], len(chars)


def windows(tokens, offsets):
  ar = torch.arange(BLOCK_SIZE)
  x = tokens[offsets[:, None] + ar]
  y = tokens[offsets[:, None] + ar + 1]
  return x, y


def learning_rate(it: int, total_steps: int) -> float:
  if it < WARMUP_STEPS:
    return LEARNING_RATE * (it + 1) / (WARMUP_STEPS + 1)
  if it >= total_steps:
    return MIN_LR
  ratio = (it - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
  coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
  return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


@torch.inference_mode()
def evaluate(model, val_x, val_y, chunk: int = 100) -> float:
  model.eval()
  total = 0.0
  for i in range(0, val_x.shape[0], chunk):
    x, y = val_x[i:i + chunk], val_y[i:i + chunk]
    # Mean over tokens of this chunk, weighted by its number of windows.
    total += loss_fn(model, x, y).item() * x.shape[0]
  model.train()
  return total / val_x.shape[0]


# ----------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=_default_data_path(),
                 help="tiny shakespeare input.txt "
                      "(default: $DECODER_JAX_DATA/tiny_shakespeare/input.txt)")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--eval_windows", type=int, default=500)
  p.add_argument("--eval_interval", type=int, default=250,
                 help="evaluate every N steps (0: only after the last step)")
  p.add_argument("--eval_seed", type=int, default=0,
                 help="seed of the fixed validation windows")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--seed", type=int, default=1337)
  p.add_argument("--autocast_bf16", action="store_true",
                 help="forward passes (training and evaluation) under "
                      "torch.autocast('cpu', bfloat16): matmuls in bfloat16, as "
                      "decoder_jax's model.matmul_dtype=bfloat16 (parameters, "
                      "optimizer and loss stay float32)")
  args = p.parse_args(argv)
  precision = (torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast_bf16
               else contextlib.nullcontext())

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  train_tokens, val_tokens, vocab = load_tokens(args.data)
  g = torch.Generator().manual_seed(args.eval_seed)
  val_offsets = torch.randint(len(val_tokens) - BLOCK_SIZE, (args.eval_windows,),
                              generator=g)
  val_x, val_y = windows(val_tokens, val_offsets)

  model = CharGPT(vocab, N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE)
  decay = [p_ for p_ in model.parameters() if p_.dim() >= 2]
  no_decay = [p_ for p_ in model.parameters() if p_.dim() < 2]
  opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": WEIGHT_DECAY},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=LEARNING_RATE, betas=BETAS, eps=EPS)
  n_params = sum(p_.numel() for p_ in model.parameters())
  print(f"vocab {vocab}, train {len(train_tokens)} / val {len(val_tokens)} "
        f"tokens, {n_params} parameters, threads {torch.get_num_threads()}",
        flush=True)

  history = []
  train_seconds = 0.0
  eval_seconds = 0.0
  train_loss = float("nan")
  for it in range(args.steps):
    t0 = time.perf_counter()
    lr = learning_rate(it, args.steps)
    for group in opt.param_groups:
      group["lr"] = lr
    offsets = torch.randint(len(train_tokens) - BLOCK_SIZE, (BATCH_SIZE,))
    x, y = windows(train_tokens, offsets)
    with precision:
      loss = loss_fn(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    train_loss = loss.item()
    train_seconds += time.perf_counter() - t0

    step = it + 1
    if step == args.steps or (args.eval_interval and
                              step % args.eval_interval == 0):
      t0 = time.perf_counter()
      with precision:
        val_loss = evaluate(model, val_x, val_y)
      eval_seconds += time.perf_counter() - t0
      history.append({"step": step, "val_loss": val_loss})
      print(f"step {step}: train loss {train_loss:.4f}, val loss "
            f"{val_loss:.4f}, lr {lr:.2e}, train {train_seconds:.1f}s",
            flush=True)

  print(json.dumps({
      "final_val_loss": history[-1]["val_loss"] if history else None,
      "final_train_loss": train_loss,
      "train_seconds": round(train_seconds, 3),
      "eval_seconds": round(eval_seconds, 3),
      "steps": args.steps,
      "evals": len(history),
      "eval_windows": args.eval_windows,
      "threads": torch.get_num_threads(),
      "seed": args.seed,
      "torch": torch.__version__,
      "autocast_bf16": args.autocast_bf16,
      "history": history,
  }), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
