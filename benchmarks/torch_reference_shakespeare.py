"""PyTorch eager reference for the shakespeare-char CPU recipe (nanoGPT's README recipe); the
recipe and its JSON line: benchmarks/README.md.

  python benchmarks/torch_reference_shakespeare.py --data DIR/tiny_shakespeare/input.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common  # benchmarks/common.py

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, BATCH_SIZE = 4, 4, 128, 64, 12
LEARNING_RATE, MIN_LR, WARMUP_STEPS, INIT_STD = 1e-3, 1e-4, 100, 0.02


class Block(nn.Module):

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.ln1, self.qkv = nn.LayerNorm(dim, bias=False), nn.Linear(dim, 3 * dim, bias=False)
    self.out = nn.Linear(dim, dim, bias=False)
    self.ln2, self.up = nn.LayerNorm(dim, bias=False), nn.Linear(dim, 4 * dim, bias=False)
    self.down = nn.Linear(4 * dim, dim, bias=False)

  def forward(self, x):
    b, t, d = x.shape  # [batch, length, embed]
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [b, heads, t, hd]
               for z in self.qkv(self.ln1(x)).split(d, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
    return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharGPT(nn.Module):
  """Pre-LN GPT: learned positions, GELU MLP, no biases, tied head, dropout 0, N(0, 0.02)
  init (residual projections / sqrt(2 * layers))."""

  def __init__(self, vocab: int):
    super().__init__()
    self.tok, self.pos = nn.Embedding(vocab, N_EMBD), nn.Embedding(BLOCK_SIZE, N_EMBD)
    self.blocks = nn.ModuleList(Block(N_EMBD, N_HEAD) for _ in range(N_LAYER))
    self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
    for blk in self.blocks:  # residual projections
      for w in (blk.out.weight, blk.down.weight):
        nn.init.normal_(w, mean=0.0, std=INIT_STD / math.sqrt(2 * N_LAYER))

  def forward(self, idx):  # idx: [batch, length]
    x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
    for blk in self.blocks:
      x = blk(x)
    return self.ln_f(x) @ self.tok.weight.t()  # tied head: [batch, length, vocab]


def loss_fn(model, x, y):
  logits = model(x)
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def windows(tokens, offsets):
  idx = offsets[:, None] + torch.arange(BLOCK_SIZE)
  return tokens[idx], tokens[idx + 1]


def learning_rate(it: int, total_steps: int) -> float:
  if it < WARMUP_STEPS:
    return LEARNING_RATE * (it + 1) / (WARMUP_STEPS + 1)
  ratio = min(1.0, (it - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
  return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LEARNING_RATE - MIN_LR)


@torch.inference_mode()
def evaluate(model, val_x, val_y, chunk: int = 100) -> float:
  """Mean token loss over the windows, chunk by chunk (weighted by their windows)."""
  model.eval()
  total = sum(loss_fn(model, val_x[i:i + chunk], val_y[i:i + chunk]).item()
              * len(val_x[i:i + chunk]) for i in range(0, len(val_x), chunk))
  model.train()
  return total / len(val_x)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = p.add_argument
  add("--data", default=os.path.join(common.data_dir(), "tiny_shakespeare", "input.txt"))
  add("--steps", type=int, default=2000)
  add("--eval_windows", type=int, default=500)
  add("--eval_interval", type=int, default=250, help="0: only after the last step")
  add("--eval_seed", type=int, default=0, help="seed of the fixed validation windows")
  add("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  add("--seed", type=int, default=1337)
  add("--autocast_bf16", action="store_true", help="forward passes under "
      "torch.autocast('cpu', bfloat16), as decoder_jax's matmul_dtype=bfloat16")
  args = p.parse_args(argv)
  precision = (torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast_bf16
               else contextlib.nullcontext())
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  with open(args.data, encoding="utf-8") as f:
    text = f.read()
  stoi = {c: i for i, c in enumerate(sorted(set(text)))}
  tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
  train_tokens, val_tokens = tokens[:int(len(tokens) * 0.9)], tokens[int(len(tokens) * 0.9):]
  g = torch.Generator().manual_seed(args.eval_seed)
  val_x, val_y = windows(val_tokens, torch.randint(len(val_tokens) - BLOCK_SIZE,
                                                   (args.eval_windows,), generator=g))
  model = CharGPT(len(stoi))
  params = list(model.parameters())
  opt = torch.optim.AdamW([{"params": [q for q in params if q.dim() >= 2], "weight_decay": 0.1},
                           {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}],
                          lr=LEARNING_RATE, betas=(0.9, 0.99), eps=1e-8)
  print(f"vocab {len(stoi)}, train {len(train_tokens)} / val {len(val_tokens)} tokens, "
        f"{sum(q.numel() for q in params)} parameters, threads {torch.get_num_threads()}",
        flush=True)

  history, train_seconds, eval_seconds, train_loss = [], 0.0, 0.0, float("nan")
  for it in range(args.steps):
    t0 = time.perf_counter()
    lr = learning_rate(it, args.steps)
    for group in opt.param_groups:
      group["lr"] = lr
    x, y = windows(train_tokens, torch.randint(len(train_tokens) - BLOCK_SIZE, (BATCH_SIZE,)))
    with precision:
      loss = loss_fn(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    train_loss = loss.item()
    train_seconds += time.perf_counter() - t0
    step = it + 1
    if step == args.steps or (args.eval_interval and step % args.eval_interval == 0):
      t0 = time.perf_counter()
      with precision:
        history.append({"step": step, "val_loss": evaluate(model, val_x, val_y)})
      eval_seconds += time.perf_counter() - t0
      print(f"step {step}: train loss {train_loss:.4f}, val loss {history[-1]['val_loss']:.4f}, "
            f"lr {lr:.2e}, train {train_seconds:.1f}s", flush=True)

  print(json.dumps({
      "final_val_loss": history[-1]["val_loss"] if history else None,
      "final_train_loss": train_loss, "train_seconds": round(train_seconds, 3),
      "eval_seconds": round(eval_seconds, 3), "steps": args.steps, "evals": len(history),
      "eval_windows": args.eval_windows, "threads": torch.get_num_threads(), "seed": args.seed,
      "torch": torch.__version__, "autocast_bf16": args.autocast_bf16, "history": history}),
        flush=True)
  return 0

if __name__ == "__main__":
  sys.exit(main())
