"""`anchorrt visalign train`: VisAlign's two-stage training from a LLaVA-1.5 checkpoint (METHODS.md, VisAlign).

    stage 1: projector + fusion trained, LLM frozen (and the vision tower, as in LLaVA)
    stage 2: projector + fusion + LLM end to end, or projector + fusion + LoRA adapters on the LLM (`lora=True`,
             needs peft; the adapters are merged into the LLM before saving, so the output is a plain checkpoint)

The model is `VisAlignLlava` (`reference.py`): the same module is the PyTorch reference of the exported graphs.
Loss: token-mean cross-entropy on the answer tokens only (labels from `data.py`). Optimiser AdamW (no weight
decay), linear warm-up then cosine decay to 0, gradient clipping at 1.0.

Runs and files:
- The output (`out_dir`) is written to a hidden temporary folder beside it and renamed into place at the end:
  a failure or an interrupt leaves nothing in `out_dir` (and an existing `out_dir` is only replaced with force).
- Training state (trainable weights, optimiser, RNG, step, losses) is saved every `save_every` steps to
  `.{out_dir.name}.visalign-state/` beside the output; `resume=True` continues from it, and only with the same
  settings (a fingerprint of them is stored). The state folder is removed when the output is written.
- Deterministic for a seed on the CPU: the batch of step k is a function of (seed, k) (a seeded permutation per
  epoch), the fusion's xavier init has its own seeded generator, and the RNG state is part of the saved state, so
  an interrupted and resumed run ends at the same weights as an uninterrupted one. GPU kernels may not be.
- On a GPU, bf16 autocast (fp16 with a gradient scaler where bf16 is missing); fp32 master weights everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from anchorrt.exporter.visalign.checkpoint import INITS, read_entry, write_entry
from anchorrt.exporter.visalign.data import IGNORE, Example, PromptFormat, load_examples
from anchorrt.graph_passes.visalign import WEIGHTS_FILE
from anchorrt.runtime.errors import AnchorError, CheckpointError

STATE_FILE = "state.pt"
STATE_VERSION = 1
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DEFAULT_LR = {1: 1e-3, 2: 2e-5}  # LLaVA-1.5's pretraining / fine-tuning rates
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


class TrainingError(AnchorError):
    """A training run cannot start or continue (bad settings, missing package, state that does not match)."""


@dataclass
class TrainSettings:
    stage: int = 1
    steps: int = 1000
    lr: float | None = None  # None: DEFAULT_LR[stage]
    batch_size: int = 8
    seed: int = 0
    init: str = "identity"
    lora: bool = False
    lora_rank: int = 16
    save_every: int = 100
    max_length: int | None = None  # None: the model's max_position_embeddings
    warmup_ratio: float = 0.03
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16/fp16 on a GPU, none on the CPU) | none | bf16 | fp16

    def check(self) -> None:
        if self.stage not in (1, 2):
            raise TrainingError(f"stage must be 1 (projector + fusion) or 2 (end to end), got {self.stage}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise TrainingError("steps, batch size and save_every must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"the learning rate must be a positive number, got {self.lr}")
        if self.init not in INITS:
            raise TrainingError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.lora and self.stage != 2:
            raise TrainingError("LoRA is for stage 2; stage 1 trains the projector and the fusion only")
        if self.device not in ("auto", "cpu", "cuda") or self.amp not in ("auto", "none", "bf16", "fp16"):
            raise TrainingError(f"unknown device {self.device!r} or amp {self.amp!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float]  # one per step, the resumed part included
    start_step: int  # 0, or the step a resumed run continued from
    seconds: float
    trainable_parameters: int
    settings: dict = field(default_factory=dict)


def state_dir_for(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.parent / f".{out.name}.visalign-state"


def lr_at(step: int, total: int, base: float, warmup_ratio: float) -> float:
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of step `step`: epoch e is a permutation seeded by (seed, e); the tail that does not fill a
    batch is left out of that epoch. A function of the step alone, so a resumed run needs no data-loader state."""
    import torch

    if n <= batch_size:
        epoch, within, per_epoch = step, 0, 1
    else:
        per_epoch = n // batch_size
        epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[within * batch_size:(within + 1) * batch_size]


def train(model_dir: str | Path, data: str | Path, out_dir: str | Path, *, image_root: str | Path | None = None,
          settings: TrainSettings | None = None, resume: bool = False, force: bool = False, progress: bool = True,
          say: Callable[[str], None] | None = None, on_step: Callable[[int, float], None] | None = None,
          **overrides) -> TrainResult:
    """Train VisAlign on `data` (LLaVA-format JSON) from the LLaVA checkpoint `model_dir`; write a VisAlign
    checkpoint to `out_dir`. `overrides` set TrainSettings fields (`stage=2, steps=500, lr=2e-5, ...`).
    `on_step(step, loss)` runs after each completed step (logging; the tests interrupt a run with it)."""
    import torch
    from anchorrt.exporter.archs.llava import LlavaArch, load_processor
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar and lines replace transformers' weight-loading bars
    t0 = time.perf_counter()
    say = say or (lambda msg: None)
    cfg = settings or TrainSettings()
    unknown = set(overrides) - set(TrainSettings.__dataclass_fields__)
    if unknown:
        raise TrainingError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    cfg = TrainSettings(**{**asdict(cfg), **overrides})
    cfg.check()
    out = Path(out_dir)
    if out.exists() and not force:
        raise TrainingError(f"output folder '{out}' already exists; pass --force to replace it")
    state_dir = state_dir_for(out)
    if resume and not (state_dir / STATE_FILE).is_file():
        raise TrainingError(f"nothing to resume: no saved state in '{state_dir}'")
    if not resume and state_dir.exists():
        raise TrainingError(f"'{state_dir}' holds the state of an earlier, unfinished run; pass --resume to continue "
                            "it, or delete the folder to start again")
    if cfg.lora:
        _import_peft()  # before anything slow: a missing package is a one-line error at once

    ckpt = inspect_checkpoint(model_dir)
    processor = load_processor(ckpt.path)
    tokenizer = processor.tokenizer
    fmt = _prompt_format(ckpt, processor, tokenizer, cfg, LlavaArch)
    examples = load_examples(data, image_root, fmt)
    say(f"{len(examples)} training examples checked")
    fingerprint = _fingerprint(ckpt.path, Path(data), image_root, cfg)

    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    amp_dtype = _amp_dtype(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    model = _load_model(ckpt.path, cfg)
    if read_entry(ckpt.path, ckpt.config) is not None:
        say(f"continuing the VisAlign fusion of '{ckpt.path}' (init {cfg.init!r} is not used)")
    trainable = _select_trainable(model, cfg)
    model.to(device).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start, losses = 0, []
    if resume:
        start, losses = _load_state(state_dir, model, optimizer, scaler, fingerprint, device)
        say(f"resumed from step {start} of {cfg.steps}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos_token_id
    image_processor = processor.image_processor
    bar = _progress_bar(cfg, start, progress)
    try:
        for step in range(start, cfg.steps):
            batch = _collate([examples[i] for i in batch_indices(step, len(examples), cfg.batch_size, cfg.seed)],
                             image_processor, pad_id, fmt, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.learning_rate, cfg.warmup_ratio)
            with _autocast(device, amp_dtype):
                loss = answer_loss(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss is {float(loss)} at step {step + 1}; lower the learning rate")
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if done % cfg.save_every == 0 and done < cfg.steps:
                _save_state(state_dir, done, names, model, optimizer, scaler, fingerprint, losses)
            if on_step is not None:
                on_step(done, losses[-1])
    finally:
        bar.close()

    model.eval()
    merged = _merge_lora(model, trainable) if cfg.lora else model
    training = {"stage": cfg.stage, "steps": cfg.steps, "lr": cfg.learning_rate, "batch_size": cfg.batch_size,
                "seed": cfg.seed, "lora": cfg.lora, "examples": len(examples), "data_sha256": fingerprint["data_sha256"],
                "final_loss": losses[-1] if losses else None}
    _write_output(ckpt.path, out, merged, training, force)
    shutil.rmtree(state_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    say(f"wrote {out} (stage {cfg.stage}, {cfg.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, {seconds:.1f} s)")
    return TrainResult(out, losses, start, seconds, sum(p.numel() for p in params), asdict(cfg))


def answer_loss(model, batch: dict):
    """Token-mean cross-entropy of the next-token prediction on answer positions only (labels -100 elsewhere)."""
    import torch.nn.functional as F

    out = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                image_mask=batch["image_mask"], enable=True)
    logits = out.logits[:, :-1].float()  # [B, L-1, V]: position t predicts token t+1
    target = batch["labels"][:, 1:]  # [B, L-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


# -- pieces -----------------------------------------------------------------------------------------------------
def _import_peft():
    try:
        import peft
    except ImportError:
        raise TrainingError("stage 2 with LoRA needs the peft package: `pip install peft` (or train stage 2 end to "
                            "end without --lora)") from None
    return peft


def _prompt_format(ckpt, processor, tokenizer, cfg: TrainSettings, arch_cls) -> PromptFormat:
    config = ckpt.config
    vision = config.get("vision_config") or {}
    image_size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)  # CLIPVisionConfig defaults
    strategy = config.get("vision_feature_select_strategy", "default")
    tokens_per_image = (image_size // patch) ** 2 + (0 if strategy == "default" else 1)
    image_token_id = int(config.get("image_token_id", config.get("image_token_index")))
    # The exporter's own rendering of the chat template (its `self` is unused), so that training prompts are
    # token for token the prompts the artifact's runtime builds.
    template = arch_cls.prompt_template(None, processor)["template"]
    eos = tokenizer.eos_token_id
    gen = ckpt.path / "generation_config.json"
    if gen.is_file():
        gen_eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        eos = (gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos) if gen_eos is not None else eos
    if eos is None:
        raise CheckpointError(f"'{ckpt.path}' names no eos token; answers need one to end")
    text = config.get("text_config") or {}
    max_length = cfg.max_length or int(text.get("max_position_embeddings", 4096))
    return PromptFormat(tokenizer, template, tokenizer.convert_ids_to_tokens(image_token_id), image_token_id,
                        tokens_per_image, int(eos), max_length)


def _fingerprint(model_dir: Path, data: Path, image_root, cfg: TrainSettings) -> dict:
    keep = ("stage", "steps", "lr", "batch_size", "seed", "init", "lora", "lora_rank", "max_length", "warmup_ratio",
            "amp")
    return {"model_dir": str(model_dir.resolve()), "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
            **{k: getattr(cfg, k) for k in keep}, "learning_rate": cfg.learning_rate}


def _amp_dtype(amp: str, device):
    import torch

    if amp == "none" or (amp == "auto" and device.type == "cpu"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if device.type == "cpu":
        raise TrainingError("fp16 autocast is for GPUs; use --amp bf16 or none on the CPU")
    return torch.float16


def _autocast(device, amp_dtype):
    import torch

    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def _load_model(model_dir: Path, cfg: TrainSettings):
    import torch
    from anchorrt.exporter.visalign.reference import VisAlignLlava

    try:
        # fp32 master weights whatever the checkpoint's dtype; the output is saved back in that dtype
        return VisAlignLlava.from_pretrained(model_dir, dtype=torch.float32, init=cfg.init, seed=cfg.seed)
    except AnchorError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"cannot load '{model_dir}' as LLaVA: {first}") from None


def _select_trainable(model, cfg: TrainSettings):
    """Freeze everything, then open what the stage trains. Returns the peft model for LoRA (else None)."""
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    if cfg.stage == 2:
        if cfg.lora:
            peft = _import_peft()
            lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.05,
                                   target_modules=LORA_TARGETS)
            peft_model = peft.get_peft_model(model.hf, lora)  # injects the adapters into model.hf in place
        else:
            for p in model.hf.model.language_model.parameters():
                p.requires_grad_(True)
            for p in model.hf.lm_head.parameters():
                p.requires_grad_(True)
    for module in (model.hf.model.multi_modal_projector, model.fusion):
        for p in module.parameters():
            p.requires_grad_(True)
    return peft_model


def _merge_lora(model, peft_model):
    model.hf = peft_model.merge_and_unload()  # the adapters folded into the LLM's weights: a plain checkpoint
    return model


def _collate(examples: list[Example], image_processor, pad_id: int, fmt: PromptFormat, device) -> dict:
    """Right-padded batch: ids, attention mask, image mask, labels [B, L] and pixel values [B, 3, H, W]."""
    import torch
    from anchorrt.exporter.visalign.data import TrainingDataError
    from PIL import Image

    length = max(len(e.input_ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros(b, length, dtype=torch.long)
    image_mask = torch.zeros(b, length, dtype=torch.bool)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    images = []
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        image_mask[row, :n] = torch.tensor(e.image_mask)
        labels[row, :n] = torch.tensor(e.labels)
        try:
            with Image.open(e.image_path) as img:
                images.append(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - a file that changed or is truncated after the up-front check
            raise TrainingDataError(f"training data entry {e.index}: image '{e.image_path.name}' cannot be read "
                                    f"({exc.__class__.__name__})") from None
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]  # [B, 3, H, W]
    batch = {"input_ids": ids, "attention_mask": attention, "image_mask": image_mask, "labels": labels,
             "pixel_values": pixel_values}
    return {k: v.to(device) for k, v in batch.items()}


def _progress_bar(cfg: TrainSettings, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"visalign stage {cfg.stage}", unit="step", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


# -- state (checkpoints for resume) ------------------------------------------------------------------------------
def _save_state(state_dir: Path, step: int, names: list[str], model, optimizer, scaler, fingerprint: dict,
                losses: list[float]) -> None:
    import torch

    state_dir.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    state = {
        "version": STATE_VERSION, "step": step, "fingerprint": fingerprint, "losses": list(losses),
        "trainable": {n: params[n].detach().cpu().clone() for n in names},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = state_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, state_dir / STATE_FILE)  # a crash while saving keeps the previous state


def _load_state(state_dir: Path, model, optimizer, scaler, fingerprint: dict, device) -> tuple[int, list[float]]:
    import torch

    try:
        state = torch.load(state_dir / STATE_FILE, map_location="cpu", weights_only=True)  # no pickle code
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise TrainingError(f"the saved state in '{state_dir}' is unreadable ({exc.__class__.__name__}); delete the "
                            "folder to start again") from None
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"the saved state in '{state_dir}' is from another version; delete it to start again")
    saved = state["fingerprint"]
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise TrainingError(f"cannot resume: {', '.join(changed)} differ from the interrupted run's; use the same "
                            "settings, or delete the state folder to start again")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor.to(device))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), list(state["losses"])


# -- output ---------------------------------------------------------------------------------------------------------
def _checkpoint_dtype(model_dir: Path):
    import torch

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else torch.float32


def _write_output(model_dir: Path, out: Path, model, training: dict, force: bool) -> None:
    """The checkpoint folder, atomically: a temporary folder beside `out`, renamed into place at the end."""
    from anchorrt.runtime.manifest import replace_folder  # the atomic swap export and bake use too

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for f in sorted(model_dir.iterdir()):  # tokenizer, processor and chat template files, as they were
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and not f.name.endswith(".index.json") \
                    and f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
        model.hf.to(_checkpoint_dtype(model_dir))  # back to the checkpoint's dtype (fp32 -> fp16/bf16 rounds)
        model.hf.save_pretrained(tmp, safe_serialization=True)
        model.fusion.save(tmp / WEIGHTS_FILE, metadata={"stage": str(training["stage"])})
        write_entry(tmp, model.fusion.hidden_size, model.fusion.init, training)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the checkpoint gets the user's usual permissions
        if out.exists() and not force:
            raise TrainingError(f"output folder '{out}' appeared during training; pass --force to replace it")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
