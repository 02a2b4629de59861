"""The pretraining loop: one CPU, one GPU, or many through torchrun (DDP / FSDP2), with exact resume.

    result = train(model, TrainConfig(max_steps=500, ...), train_data, ckpt_dir="run/checkpoints",
                   val_batches=lambda: val_loader.epoch(), fingerprint={"data": ..., "tokenizer": ...})

`train_data` is a resumable batch source: `next_batch() -> (inputs, targets)` (or `__next__`), `state_dict()` and
`load_state_dict(state)` (see llm/data.py). The model is any module with `model(idx, targets) -> (logits, loss)`.

Checkpoints (`ckpt_dir/step_00000100/`, see llm.train.checkpoints) hold everything needed to continue bit for bit.
Resume picks the newest checkpoint whose files match its manifest (older ones are the fallback) and refuses one made
for another model, tokenizer, data or global batch.

Under torchrun (`torchrun --nproc-per-node=N ...`) the same call runs data parallel: DDP by default, FSDP2
(`parallel="fsdp"`) to shard parameters per block; rank 0 logs and writes the shared checkpoint files, every rank
writes its own RNG and loader state. On CUDA: bf16 autocast, TF32, torch.compile and fused AdamW. Everywhere: the
chunked LM-head + cross-entropy of llm.loss that never materialises the full logits.

Modules: `config` (TrainConfig, TrainResult, errors), `checkpoints` (writing, verifying and reading them), `rng`
(random streams), `loop` (train, evaluate).
"""

from llm.loss import FusedLossLM, check_loss_kernel, linear_cross_entropy, supports_fused_loss
from llm.train.checkpoints import Checkpointer, clean_partial, list_checkpoints, verify_checkpoint
from llm.train.config import (
    CheckpointError,
    LoopState,
    ResumeMismatch,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    TrainResult,
)
from llm.train.loop import evaluate, train

__all__ = [
    "CheckpointError", "Checkpointer", "FusedLossLM", "LoopState", "ResumeMismatch", "TrainConfig", "TrainResult",
    "TrainingDiverged", "TrainingError", "check_loss_kernel", "clean_partial", "evaluate", "linear_cross_entropy",
    "list_checkpoints", "supports_fused_loss", "train", "verify_checkpoint",
]
