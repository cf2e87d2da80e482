"""`anchorrt visalign ...`: VisAlign's commands (training; the fusion is baked by `anchorrt export` when the
checkpoint carries it). Registered on the main group by `anchorrt/cli.py`.

    anchorrt visalign train --data llava.json --image-root images/ --model llava-1.5-7b-hf -o va-stage1 --stage 1
    anchorrt visalign train --data llava.json --image-root images/ --model va-stage1 -o va-stage2 --stage 2 --lora
    anchorrt export va-stage2 -o out/va        # the fusion goes into the embed graph, behind visalign.enable
"""

from __future__ import annotations

from pathlib import Path

import click

from anchorrt.cli_common import friendly as _friendly


@click.group()
def visalign() -> None:
    """VisAlign: visually refined text embeddings (train the fusion; export bakes it into the embed graph)."""


@visalign.command()
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="LLaVA-format JSON: a list of {image, conversations}.")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Folder the entries' image paths are relative to (default: the data file's folder).")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="LLaVA-1.5 checkpoint folder (stage 2: usually the stage-1 output).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="VisAlign checkpoint folder to create.")
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True,
              help="1: projector + fusion, LLM frozen; 2: end to end (or LoRA with --lora).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-3 in stage 1, 2e-5 in stage 2].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init", type=click.Choice(["identity", "xavier"]), default="identity", show_default=True,
              help="Initial fusion: W = [I | 0], b = 0 (the base model exactly), or xavier.")
@click.option("--lora", is_flag=True, help="Stage 2 with LoRA adapters on the LLM (needs `pip install peft`).")
@click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Save the training state every N steps (for --resume).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run with the same settings.")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Truncate sequences to N tokens [default: the model's context].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["auto", "none", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision (auto: bf16/fp16 on a GPU, fp32 on the CPU).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (atomically, at the end).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def train(data, image_root, model_dir, out_dir, stage, steps, lr, batch_size, seed, init, lora, lora_rank, save_every,
          resume, max_length, device, amp, force, no_progress) -> None:
    """Train VisAlign's fusion (and projector; stage 2: the LLM) on your LLaVA-format data."""
    from anchorrt.cli import _say
    from anchorrt.exporter.visalign.train import train as run_train

    run_train(model_dir, data, out_dir, image_root=image_root, resume=resume, force=force, progress=not no_progress,
              say=_say, stage=stage, steps=steps, lr=lr, batch_size=batch_size, seed=seed, init=init, lora=lora,
              lora_rank=lora_rank, save_every=save_every, max_length=max_length, device=device, amp=amp)
