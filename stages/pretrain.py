"""Pretraining stage: tokenized shards -> a base model (our checkpoint + a transformers-native export).

Inputs: `tokenizer` and `tokens` (the tokenizer stage), optional `tasks` (ingest; adds the base model's exact match).
Outputs: `checkpoint` (model.safetensors + config.json + tokenizer/) and `hf` (transformers-native, with tokenizer).
Training checkpoints live in `out_dir/train_checkpoints/`; rerunning the stage after a crash resumes from the newest
intact one, and rerunning a finished stage with the same config and inputs returns the saved result.
The loop itself is `llm.train`; under torchrun this stage runs on every rank and only rank 0 writes outputs.

The training settings are `llm.train.TrainConfig`'s fields: they are declared (type, default, bounds, description)
once, on that dataclass, and pydantic validates them here under the same names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from llm.train.config import TrainConfig
from stages.common import (
    NullTracker,
    StageError,
    StageResult,
    Tracker,
    atomic_file,
    require_path,
    sha256_tree,
    write_json,
)
from stages.posttrain.model_card import settings_of, write_model_card
from stages.runtime.launch import FileTracker, LaunchSettings, launch, should_launch

log = logging.getLogger(__name__)
HANDOVER = "launch_result.json"  # rank 0's metrics and samples, for the process that launched the workers

DEFAULT_PROMPTS = [
    "Mia has a red kite and Tom has a green boat. Who has the green boat?",
    "Leo has 9 pears. Leo gives 4 pears to Sam. How many pears does Leo have now?",
    "7 plus 5 is",
    "The old owl sleeps",
]
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _train_fields() -> dict[str, Any]:
    """TrainConfig's fields as pydantic fields: type, default, bounds and description as the dataclass declares
    them (its field metadata holds pydantic `Field` arguments)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: (hints[f.name], Field(f.default, **f.metadata)) for f in dataclasses.fields(TrainConfig)}


class _ModelChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="Model size preset (llm.config.PRESETS): tiny, tiny-gpt2, tiny-mla, "
                       "gpt2-124m, llama-124m, ...")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields that replace the "
                                            "preset's, e.g. {n_layer: 8, dropout: 0.1}. vocab_size always comes "
                                            "from the tokenizer.")


_Training = create_model("_Training", __base__=_ModelChoice, __module__=__name__, **_train_fields())


class Config(_Training, LaunchSettings):
    """The model to build, every TrainConfig setting (seq_len None: the model's context), and the stage's own
    sampling and evaluation settings."""

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


def build_model_config(cfg: Config, vocab_size: int):
    """The ModelConfig the pretrain config builds for a tokenizer of `vocab_size` tokens."""
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


@dataclass
class _Job:
    """The checked inputs and settings of one run."""

    tok_dir: Path
    tokens_dir: Path
    tasks_dir: Path | None
    manifest: dict[str, Any]
    tokenizer: Any  # llm.tokenizer.Tokenizer
    model_cfg: Any  # llm.config.ModelConfig
    train_cfg: TrainConfig
    device: Any  # torch.device
    info: Any  # llm.distributed.DistInfo
    fingerprint: dict[str, str] = field(default_factory=dict)


def _read_inputs(inputs: dict[str, Path]) -> tuple[Path, Path, Path | None, dict, Any]:
    """The tokenizer and token shards (and the optional tasks folder), checked to belong together."""
    from llm.data import DataError, read_manifest
    from llm.tokenizer import Tokenizer

    tok_dir = require_path(inputs.get("tokenizer", ""), "input `tokenizer` (tokenizer folder)")
    tokens_dir = require_path(inputs.get("tokens", ""), "input `tokens` (token shards folder)")
    tasks_dir = Path(inputs["tasks"]) if inputs.get("tasks") else None
    try:
        manifest = read_manifest(tokens_dir)
    except DataError as e:
        raise StageError(str(e)) from e
    try:
        tokenizer = Tokenizer.from_dir(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"input tokenizer {tok_dir}: {e}") from e
    if manifest.get("vocab_size") not in (None, tokenizer.vocab_size):
        raise StageError(
            f"{tokens_dir}/manifest.json says vocab_size={manifest['vocab_size']} but the tokenizer in {tok_dir} has "
            f"{tokenizer.vocab_size} tokens; pass the tokenizer and tokens written by the same tokenizer-stage run"
        )
    return tok_dir, tokens_dir, tasks_dir, manifest, tokenizer


def _prepare(cfg: Config, inputs: dict[str, Path]) -> _Job:
    """Validate everything before any compute or write; StageError names the setting or input to fix."""
    from llm import distributed as D
    from llm.data import data_fingerprint
    from llm.device import resolve_device
    from llm.loss import check_loss_kernel

    tok_dir, tokens_dir, tasks_dir, manifest, tokenizer = _read_inputs(inputs)
    model_cfg = build_model_config(cfg, tokenizer.vocab_size)
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise StageError(
            f"pretrain.seq_len={seq_len} exceeds the model's context (max_seq_len={model_cfg.max_seq_len} in "
            f"preset {cfg.model!r}); lower pretrain.seq_len or set model_overrides.max_seq_len"
        )
    try:
        tcfg = TrainConfig(**cfg.model_dump(include=TRAIN_FIELDS)).with_seq_len(seq_len)
        device = resolve_device(tcfg.device, "pretrain.device")
        check_loss_kernel(tcfg, device)
        info = D.init_distributed(device.type)
        tcfg.grad_accum_steps(info.world_size)
    except ValueError as e:
        raise StageError(f"pretrain config: {str(e).replace('TrainConfig.', 'pretrain.')}") from e
    fingerprint = {"tokenizer": manifest.get("tokenizer_sha256") or sha256_tree(tok_dir),
                   "data": data_fingerprint(tokens_dir)}
    return _Job(tok_dir, tokens_dir, tasks_dir, manifest, tokenizer, model_cfg, tcfg, device, info, fingerprint)


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
    from llm import distributed as D

    out_dir = Path(out_dir)
    job = _prepare(cfg, inputs)
    outputs = {"checkpoint": out_dir / "checkpoint", "hf": out_dir / "hf"}
    plot_path = out_dir / "loss_curve.png"
    if should_launch(cfg):
        return _launch(cfg, job, inputs, out_dir, tracker, outputs, plot_path)
    report = _Report(tracker)
    result, n_params = _train(cfg, job, out_dir / "train_checkpoints", report)
    metrics = _metrics(result, n_params)
    samples = [_sample_row("generation", result.step, row) for row in result.samples]
    plots: dict[str, Path] = {}
    if job.info.is_main:
        _export(result.checkpoint, job.tok_dir, outputs)
        if result.losses or report.evals:
            _plot(result.losses, report.evals, plot_path)
            plots["loss_curve"] = plot_path
        if job.tasks_dir is not None:
            metrics.update(_exact_match(outputs["hf"], job.tasks_dir, cfg.exact_match_limit, samples, result.step))
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(("val/", "eval/"))}, step=result.step)
        write_model_card(outputs["hf"], "pretrain", "random initialisation", "the ingest stage's corpus, encoded by "
                         "the tokenizer stage", metrics,
                         {"model": cfg.model, **settings_of(cfg, ("max_steps", "seq_len", "lr", "seed"))})
        write_json(out_dir / HANDOVER, {"metrics": metrics, "samples": samples})  # read by `_launch`
    D.barrier(job.info)
    return StageResult(outputs=outputs, metrics=metrics, samples=samples, plots=plots)


def _launch(cfg: Config, job: _Job, inputs: dict[str, Path], out_dir: Path, tracker: Tracker,
            outputs: dict[str, Path], plot_path: Path) -> StageResult:
    """Train on cfg.world_size worker processes (stages.runtime.launch); rank 0 leaves the result this process returns."""
    try:
        job.train_cfg.grad_accum_steps(cfg.world_size)
    except ValueError as e:
        raise StageError(f"pretrain config: {str(e).replace('TrainConfig.', 'pretrain.')}") from e
    (out_dir / HANDOVER).unlink(missing_ok=True)
    launch(cfg, out_dir, tracker, _launched_worker, cfg.model_dump_json(),
           {k: str(v) for k, v in inputs.items()}, str(out_dir))
    if cfg.node_rank != 0:  # the outputs are node 0's
        return StageResult(outputs=outputs)
    try:
        handed = json.loads((out_dir / HANDOVER).read_text())
    except (OSError, json.JSONDecodeError):
        raise StageError(f"the pretrain workers ended without writing the result under {out_dir}; see their log") from None
    plots = {"loss_curve": plot_path} if plot_path.is_file() else {}
    return StageResult(outputs=outputs, metrics=handed["metrics"], samples=handed["samples"], plots=plots)


def _launched_worker(cfg_json: str, inputs: dict[str, str], out_dir: str, metrics_path: str) -> None:
    """One rank of a run launched by the stage: rank 0 reports through the metrics file, the others log nothing."""
    from llm import distributed as D

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = Config.model_validate_json(cfg_json)
    pids = Path(out_dir) / ".launch"  # which process is which rank, for whoever has to inspect or stop one
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{os.environ.get('RANK', '0')}.pid").write_text(f"{os.getpid()}\n")
    tracker = FileTracker(metrics_path) if os.environ.get("RANK") == "0" else NullTracker()
    run(cfg, {k: Path(v) for k, v in inputs.items()}, Path(out_dir), tracker)
    D.destroy()  # leave the process group before the launcher collects the return value


class _Report:
    """The loop's on_step / on_eval: every metric to the tracker, validation losses kept for the plot."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.evals: list[tuple[int, float]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evals.append((step, metrics["val/loss"]))
        self.tracker.log_metrics(metrics, step=step)


class _Sampler:
    """Greedy (or sampled) continuations of the configured prompts: the loop's sample_fn."""

    def __init__(self, cfg: Config, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = [tokenizer.encode(p) for p in cfg.sample_prompts]

    def __call__(self, model: Any) -> list[dict[str, Any]]:
        from llm.generate import generate

        if not self.prompts:
            return []
        cfg, tok = self.cfg, self.tokenizer
        was_training = model.training
        model.eval()
        try:
            # documents follow an EOS in the token stream, so a prompt starts the way documents do
            new = generate(model, [[tok.eos_id, *p] for p in self.prompts], cfg.sample_max_new_tokens,
                           temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, eos_token_id=tok.eos_id,
                           seed=cfg.seed, pad_token_id=tok.pad_id, compile=False)
        finally:
            model.train(was_training)
        return [{"prompt": p, "response": tok.decode(n, skip_special_tokens=True)}
                for p, n in zip(cfg.sample_prompts, new, strict=True)]


def _train(cfg: Config, job: _Job, ckpt_dir: Path, report: _Report) -> tuple[Any, int]:
    """Build the model and run the loop (resuming from `ckpt_dir`); returns the loop's result and the model size."""
    import functools

    import torch

    from llm import train as T
    from llm.data import DataError, PretrainLoader, eval_batches
    from llm.model import build_model

    tcfg, info = job.train_cfg, job.info
    try:
        loader = PretrainLoader(job.tokens_dir, batch_size=tcfg.micro_batch_size, max_seq_len=tcfg.seq_len,
                                seed=tcfg.seed, rank=info.rank, world_size=info.world_size,
                                pin_memory=job.device.type == "cuda")
    except DataError as e:
        raise StageError(str(e)) from e
    has_val = any(s.get("split") == "val" for s in job.manifest.get("shards", []))
    val_batches = functools.partial(eval_batches, job.tokens_dir, tcfg.micro_batch_size, tcfg.seq_len, split="val",
                                    max_batches=tcfg.eval_batches, rank=info.rank, world_size=info.world_size)
    bytes_per_token = (job.manifest.get("splits", {}).get("val") or {}).get("bytes_per_token")
    sampler = _Sampler(cfg, job.tokenizer)
    torch.manual_seed(tcfg.seed)
    model = build_model(job.model_cfg)
    try:
        result = T.train(
            model, tcfg, loader, ckpt_dir, val_batches=val_batches if has_val else None,
            bytes_per_token=bytes_per_token, fingerprint=job.fingerprint, on_step=report.on_step,
            on_eval=report.on_eval, sample_fn=sampler, resume=cfg.resume,
        )
    except T.TrainingError as e:
        raise StageError(f"pretrain: {e}") from e
    except DataError as e:
        raise StageError(str(e)) from e
    return result, sum(p.numel() for p in model.parameters())


def _metrics(result: Any, n_params: int) -> dict[str, float]:
    metrics: dict[str, float] = {
        "train/loss": result.train_loss,
        "train/tokens": float(result.tokens),
        "train/skipped_steps": float(result.skipped_steps),
        "train/seconds": result.seconds,
        "params": float(n_params),
        "train/resumed_from": float(result.resumed_from),  # the checkpoint step a rerun went on from (0: none)
    }
    if result.losses:
        tail = [x for _, x in result.losses[-20:] if math.isfinite(x)]
        metrics["train/loss_last20"] = sum(tail) / max(1, len(tail))
        trained = (result.step - result.resumed_from) * result.tokens // max(1, result.step)
        metrics["train/tokens_per_s"] = trained / max(result.seconds, 1e-9)
    metrics.update(result.val)
    return metrics


def _export(train_checkpoint: Path, tok_dir: Path, outputs: dict[str, Path]) -> None:
    """Our checkpoint folder and the transformers export, from the final training checkpoint."""
    from llm.checkpoint import load_model, save_model
    from llm.hf import export_hf

    # the final training checkpoint holds the full (gathered) weights whatever the parallelism was
    final, _ = load_model(train_checkpoint)
    save_model(outputs["checkpoint"], final, tokenizer_dir=tok_dir)
    export_hf(outputs["checkpoint"], outputs["hf"], tokenizer_dir=tok_dir)


def _exact_match(hf_dir: Path, tasks_dir: Path, limit: int | None, samples: list[dict], step: int) -> dict[str, float]:
    """The base model's exact match on held-out prompts (low: it has never seen the chat format)."""
    from stages.posttrain.scoring import evaluate_exact_match

    metrics, rows = evaluate_exact_match(hf_dir, tasks_dir, limit=limit)
    samples.extend(_sample_row("exact_match", step, r) for r in rows[:5])
    return {k: float(v) for k, v in metrics.items()}


SAMPLE_COLUMNS = ("source", "step", "prompt", "response", "expected", "correct", "kind")


def _sample_row(source: str, step: int, row: dict) -> dict:
    """One row of the samples table: free generations and exact-match answers share the same columns, so the
    MLflow/Prefect table has one `response` column (`expected`/`correct`/`kind` stay empty for generations)."""
    full = {"source": source, "step": step, **row}
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
