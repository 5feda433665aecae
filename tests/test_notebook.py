"""notebooks/finetune_lora.ipynb runs top to bottom (nbclient) on a tiny budget."""

import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_finetune_lora_notebook_runs(task_data_dir, tmp_path, tiny_pretrained):
  notebook = nbformat.read(REPO / "notebooks" / "finetune_lora.ipynb", as_version=4)
  env = dict(NOTEBOOK_MODEL=str(tiny_pretrained), NOTEBOOK_STEPS="2",
             NOTEBOOK_TRAIN_EXAMPLES="32", NOTEBOOK_EVAL_EXAMPLES="6",
             NOTEBOOK_WORKDIR=str(tmp_path / "w"), DECODER_JAX_DATA=str(task_data_dir),
             DECODER_JAX_REPO=str(REPO), XLA_FLAGS="", JAX_PLATFORMS="cpu",
             TFDS_DATA_DIR=str(tmp_path / "tfds"))
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "zero-shot BLEU on 6 val sentences" in outputs
  assert "LoRA BLEU on 6 val sentences" in outputs
  assert outputs.count("  -> ") == 3
