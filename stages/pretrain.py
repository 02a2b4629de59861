"""Pretraining stage: tokenized shards -> a base model (our checkpoint + a transformers-native export).

Inputs: `tokenizer` and `tokens` (the tokenizer stage), optional `tasks` (ingest; adds the base model's exact match).
Outputs: `checkpoint` (model.safetensors + config.json + tokenizer/) and `hf` (transformers-native, with tokenizer).
Training checkpoints live in `out_dir/train_checkpoints/`; rerunning the stage after a crash resumes from the newest
intact one, and rerunning a finished stage with the same config and inputs returns the saved result.
The loop itself is `llm.train`; under torchrun this stage runs on every rank and only rank 0 writes outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    atomic_file,
    read_json,
    require_path,
    sha256_tree,
    write_json,
)

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "Mia has a red kite and Tom has a green boat. Who has the green boat?",
    "Leo has 9 pears. Leo gives 4 pears to Sam. How many pears does Leo have now?",
    "7 plus 5 is",
    "The old owl sleeps",
]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="Model size preset (llm.config.PRESETS): tiny, tiny-gpt2, tiny-mla, "
                       "gpt2-124m, llama-124m, ...")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields that replace the "
                                            "preset's, e.g. {n_layer: 8, dropout: 0.1}. vocab_size always comes "
                                            "from the tokenizer.")
    # tiny default: at 600 steps validation loss ended 1.04 / 1.09 / 1.13 / 1.18 for seeds 1337 / 2 / 3 / 1 (the
    # sharp drop that comes when the model learns to copy names from its context came in time for some seeds, not
    # for others); at 1000 steps seeds 1337 and 1 both ended at 1.01.
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train (1000 x 2048 tokens: ~2.3 epochs of the "
                           "built-in corpus, ~3 minutes on 2 CPU cores).")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward pass on one device.")
    max_seq_len: int | None = Field(128, ge=8, description="Training sequence length in tokens (None: the model's "
                                    "context). Must not exceed the model's max_seq_len.")
    tokens_per_step: int | None = Field(None, ge=1, description="Global tokens per optimizer step; gradient "
                                        "accumulation makes up the difference. None: one micro batch per device.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The cosine decay ends at lr x this.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms, biases, "
                                "embeddings).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    eval_interval: int = Field(100, ge=0, description="Evaluate (val loss/ppl/bpb, sample generations) every N "
                               "steps and at the end; 0 = only at the end.")
    eval_batches: int = Field(10, ge=1, description="Validation batches per evaluation.")
    checkpoint_interval: int = Field(100, ge=0, description="Save a resumable training checkpoint every N steps "
                                     "and at the end; 0 = only at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Training checkpoints kept on disk (newest first).")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many consecutive steps with a non-finite "
                               "loss or gradient (each one is skipped, never applied).")
    seed: int = Field(1337, description="Seed for initialisation, data order and dropout.")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on "
                                                       "CPU.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model: auto = on for CUDA "
                                                  "only (compiling costs more than it saves on a small CPU run).")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp replicates the model, fsdp "
                                             "(FSDP2) shards it per block for models that do not fit one card.")
    fused_loss: Literal["auto", "on", "off"] = Field("auto", description="Chunked LM head + cross-entropy that "
                                                     "never holds all logits (less memory; faster on CUDA and "
                                                     "CPU): auto = on (off under FSDP).")
    loss_kernel: Literal["auto", "on", "off"] = Field("auto", description="The fused loss's softmax gradient in "
                                                      "one Triton kernel (llm/kernels.py) instead of torch ops: "
                                                      "auto = on where Triton runs (CUDA).")
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="Plain-text "
                                      "prompts continued by the model at each evaluation.")
    sample_max_new_tokens: int = Field(24, ge=1, description="Tokens generated per sample prompt.")
    sample_temperature: float = Field(0.0, ge=0, description="Sampling temperature (0 = greedy).")
    sample_top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens (None = all).")
    exact_match_limit: int | None = Field(None, ge=1, description="When `tasks` is given: held-out prompts used for "
                                          "the base model's eval/exact_match (None = all).")
    resume: bool = Field(True, description="Resume from the newest intact training checkpoint in the output folder.")


def _config_error(e: Exception, field: str) -> StageError:
    return StageError(f"pretrain.{field}: {e}")


def _model_config(cfg: Config, vocab_size: int):
    from llm.config import PRESETS, get_config

    if cfg.model not in PRESETS:
        raise StageError(f"pretrain.model: unknown preset {cfg.model!r}; choose one of {sorted(PRESETS)}")
    overrides = dict(cfg.model_overrides)
    if overrides.get("vocab_size", vocab_size) != vocab_size:
        raise StageError(
            f"pretrain.model_overrides.vocab_size={overrides['vocab_size']} disagrees with the tokenizer's "
            f"{vocab_size} tokens; remove it (the vocabulary size always comes from the tokenizer)"
        )
    overrides["vocab_size"] = vocab_size
    try:
        return get_config(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        raise _config_error(e, "model_overrides") from e


def _key(cfg: Config, fingerprint: dict) -> str:
    """What a finished run's outputs depend on: the config (resume excluded) and the inputs' content."""
    blob = json.dumps({"cfg": cfg.model_dump(mode="json", exclude={"resume"}), "inputs": fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _plot(losses: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        steps, vals = zip(*losses, strict=True)
        ax.plot(steps, vals, lw=0.8, alpha=0.8, label="train loss")
    if evals:
        steps, vals = zip(*evals, strict=True)
        ax.plot(steps, vals, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    """Pretrain the configured model on `inputs["tokens"]`; see the module docstring for inputs and outputs."""
    import torch

    from llm import distributed as D
    from llm import train as T
    from llm.device import resolve_device
    from llm.data import DataError, PretrainLoader, data_fingerprint, eval_batches, read_manifest
    from llm.tokenizer import Tokenizer
    from llm.utils import on_off_auto

    out_dir = Path(out_dir)
    tok_dir = require_path(inputs.get("tokenizer", ""), "input `tokenizer` (tokenizer folder)")
    tokens_dir = require_path(inputs.get("tokens", ""), "input `tokens` (token shards folder)")
    tasks_dir = Path(inputs["tasks"]) if inputs.get("tasks") else None

    # ---- validate everything before any compute or write --------------------------------------------------
    try:
        manifest = read_manifest(tokens_dir)
    except DataError as e:
        raise StageError(str(e)) from e
    try:
        tokenizer = Tokenizer.from_dir(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"input tokenizer {tok_dir}: {e}") from e
    vocab_size = tokenizer.vocab_size
    if manifest.get("vocab_size") not in (None, vocab_size):
        raise StageError(
            f"{tokens_dir}/manifest.json says vocab_size={manifest['vocab_size']} but the tokenizer in {tok_dir} has "
            f"{vocab_size} tokens; pass the tokenizer and tokens written by the same tokenizer-stage run"
        )
    model_cfg = _model_config(cfg, vocab_size)
    seq_len = cfg.max_seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise StageError(
            f"pretrain.max_seq_len={seq_len} exceeds the model's context (max_seq_len={model_cfg.max_seq_len} in "
            f"preset {cfg.model!r}); lower pretrain.max_seq_len or set model_overrides.max_seq_len"
        )
    tok_hash = manifest.get("tokenizer_sha256") or sha256_tree(tok_dir)
    try:
        tcfg = T.TrainConfig(
            max_steps=cfg.max_steps, micro_batch_size=cfg.micro_batch_size, seq_len=seq_len,
            tokens_per_step=cfg.tokens_per_step, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
            grad_clip=cfg.grad_clip, eval_interval=cfg.eval_interval, eval_batches=cfg.eval_batches,
            checkpoint_interval=cfg.checkpoint_interval, keep_last=cfg.keep_checkpoints,
            max_bad_steps=cfg.max_bad_steps, device=cfg.device, precision=cfg.precision,
            compile=on_off_auto(cfg.compile), parallel=cfg.parallel, seed=cfg.seed,
            fused_loss=on_off_auto(cfg.fused_loss), loss_kernel=on_off_auto(cfg.loss_kernel),
        )
        device = resolve_device(cfg.device, "TrainConfig.device")
        T.check_loss_kernel(tcfg, device)
        info = D.init_distributed(device.type)
        tcfg.grad_accum_steps(info.world_size)
    except ValueError as e:
        raise StageError(f"pretrain config: {str(e).replace('TrainConfig.', 'pretrain.')}") from e

    fingerprint = {"tokenizer": tok_hash, "data": data_fingerprint(tokens_dir)}
    key = _key(cfg, fingerprint)
    outputs = {"checkpoint": out_dir / "checkpoint", "hf": out_dir / "hf"}
    done_file = out_dir / "result.json"
    if done_file.is_file() and all(p.exists() for p in outputs.values()):
        done = read_json(done_file, "pretrain result")
        if done.get("key") == key:
            log.info("pretrain: %s already holds this run's outputs; reusing them", out_dir)
            plots = {"loss_curve": out_dir / "loss_curve.png"} if (out_dir / "loss_curve.png").is_file() else {}
            samples = [_sample_row(r.get("source", ""), r.get("step", 0), r) for r in done["samples"]]
            return StageResult(outputs=outputs, metrics=done["metrics"], samples=samples, plots=plots)

    try:
        loader = PretrainLoader(tokens_dir, batch_size=cfg.micro_batch_size, max_seq_len=seq_len, seed=cfg.seed,
                                rank=info.rank, world_size=info.world_size, pin_memory=device.type == "cuda")
    except DataError as e:
        raise StageError(str(e)) from e
    has_val = any(s.get("split") == "val" for s in manifest.get("shards", []))
    bytes_per_token = (manifest.get("splits", {}).get("val") or {}).get("bytes_per_token")

    def val_batches():
        return eval_batches(tokens_dir, cfg.micro_batch_size, seq_len, split="val", max_batches=cfg.eval_batches,
                            rank=info.rank, world_size=info.world_size)

    prompts = [tokenizer.encode(p) for p in cfg.sample_prompts]

    def sample_fn(model: torch.nn.Module) -> list[dict[str, Any]]:
        from llm.generate import generate

        if not prompts:
            return []
        was_training = model.training
        model.eval()
        try:
            # documents follow an EOS in the token stream, so a prompt starts the way documents do
            new = generate(model, [[tokenizer.eos_id, *p] for p in prompts], cfg.sample_max_new_tokens,
                           temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, eos_token_id=tokenizer.eos_id,
                           seed=cfg.seed, pad_token_id=tokenizer.pad_id, compile=False)
        finally:
            model.train(was_training)
        return [{"prompt": p, "response": tokenizer.decode(n, skip_special_tokens=True)}
                for p, n in zip(cfg.sample_prompts, new, strict=True)]

    evals: list[tuple[int, float]] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(metrics, step=step)

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        evals.append((step, metrics["val/loss"]))
        tracker.log_metrics(metrics, step=step)

    from llm.model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    ckpt_dir = out_dir / "train_checkpoints"
    try:
        result = T.train(
            model, tcfg, loader, ckpt_dir, val_batches=val_batches if has_val else None,
            bytes_per_token=bytes_per_token, fingerprint=fingerprint, on_step=on_step, on_eval=on_eval,
            sample_fn=sample_fn, resume=cfg.resume,
        )
    except T.TrainingError as e:
        raise StageError(f"pretrain: {e}") from e
    except DataError as e:
        raise StageError(str(e)) from e

    metrics: dict[str, float] = {
        "train/loss": result.train_loss,
        "train/tokens": float(result.tokens),
        "train/skipped_steps": float(result.skipped_steps),
        "train/seconds": result.seconds,
        "params": float(sum(p.numel() for p in model.parameters())),
    }
    if result.losses:
        tail = [x for _, x in result.losses[-20:] if math.isfinite(x)]
        metrics["train/loss_last20"] = sum(tail) / max(1, len(tail))
        trained = (result.step - result.resumed_from) * result.tokens // max(1, result.step)
        metrics["train/tokens_per_s"] = trained / max(result.seconds, 1e-9)
    metrics.update(result.val)
    samples = [_sample_row("generation", result.step, row) for row in result.samples]

    plots: dict[str, Path] = {}
    if info.is_main:
        from llm.checkpoint import load_model, save_model
        from llm.hf import export_hf

        # the final training checkpoint holds the full (gathered) weights whatever the parallelism was
        final, _ = load_model(result.checkpoint)
        save_model(outputs["checkpoint"], final, tokenizer_dir=tok_dir)
        export_hf(outputs["checkpoint"], outputs["hf"], tokenizer_dir=tok_dir)
        if result.losses or evals:
            _plot(result.losses, evals, out_dir / "loss_curve.png")
            plots["loss_curve"] = out_dir / "loss_curve.png"
        if tasks_dir is not None:
            metrics.update(_exact_match(outputs["hf"], tasks_dir, cfg.exact_match_limit, samples, result.step))
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(("val/", "eval/"))}, step=result.step)
        write_json(done_file, {"key": key, "metrics": metrics, "samples": samples})
    D.barrier(info)
    return StageResult(outputs=outputs, metrics=metrics, samples=samples, plots=plots)


def _exact_match(hf_dir: Path, tasks_dir: Path, limit: int | None, samples: list[dict], step: int) -> dict[str, float]:
    """The base model's exact match on held-out prompts (low: it has never seen the chat format)."""
    from stages.evaluate import evaluate_exact_match

    metrics, rows = evaluate_exact_match(hf_dir, tasks_dir, limit=limit)
    samples.extend(_sample_row("exact_match", step, r) for r in rows[:5])
    return {k: float(v) for k, v in metrics.items()}


SAMPLE_COLUMNS = ("source", "step", "prompt", "response", "expected", "correct", "kind")


def _sample_row(source: str, step: int, row: dict) -> dict:
    """One row of the samples table: free generations and exact-match answers share the same columns, so the
    MLflow/Prefect table has one `response` column (`expected`/`correct`/`kind` stay empty for generations)."""
    full = {"source": source, "step": step, **row}
    if "completion" in full:  # rows written by earlier versions (result.json of a resumed run)
        full.setdefault("response", full.pop("completion"))
    return {c: full.get(c) for c in SAMPLE_COLUMNS}


def main(argv: list[str] | None = None) -> None:
    """Run the stage without Prefect or MLflow, e.g. on GPU workers under torchrun:

    torchrun --nproc-per-node=8 -m stages.pretrain --tokenizer T --tokens D --out O --config configs/gpt2-124m.yaml
    """
    import argparse

    import yaml

    p = argparse.ArgumentParser(prog="python -m stages.pretrain", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (tokenizer stage output)")
    p.add_argument("--tokens", required=True, type=Path, help="token shards folder (tokenizer stage output)")
    p.add_argument("--tasks", type=Path, default=None, help="tasks folder (ingest output) for eval/exact_match")
    p.add_argument("--out", required=True, type=Path, help="output folder (rerun it to resume)")
    p.add_argument("--config", type=Path, default=None, help="YAML file: its `pretrain` section (or the whole file)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set max_steps=100 (value parsed as YAML)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    values: dict[str, Any] = {}
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        values = dict(loaded.get("pretrain", loaded))
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=100")
        values[key.removeprefix("pretrain.")] = yaml.safe_load(raw)
    try:
        cfg = Config(**values)
        inputs = {"tokenizer": args.tokenizer, "tokens": args.tokens}
        if args.tasks is not None:
            inputs["tasks"] = args.tasks
        result = run(cfg, inputs, args.out)
    except StageError as e:
        raise SystemExit(f"error: {e}") from None
    except ValueError as e:  # pydantic's ValidationError names the field
        raise SystemExit(f"error in the pretrain config: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()}, "metrics": result.metrics}))
    from llm import distributed as D

    D.exit_worker()  # under torchrun: ranks leave the process group together (returns on one process)


if __name__ == "__main__":
    main()
