"""The evaluate stage's yardstick on any data: bits per byte of the base, SFT and aligned models on the held-out
pretraining text (the corpus's validation split) and on the held-out chat answers (the SFT stage's held-out set),
computed by `stages.posttrain.heldout_metrics` (canonical), plus the same text as the local lm-eval task `heldout_text`, so
lm-eval's own figure stands beside it in its results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stages.posttrain.heldout_metrics import response_bpb, text_bpb

log = logging.getLogger(__name__)

TASK = "heldout_text"
_YAML = """task: heldout_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
metadata:
  version: 1.0
"""


def val_docs(corpus_dir: Path, limit: int) -> list[str]:
    """The first `limit` documents of the corpus's validation split (the train split when it has none)."""
    from stages.data.corpus_reader import iter_texts, read_manifest

    manifest = read_manifest(corpus_dir)
    split = "val" if manifest["rows"].get("val") else "train"
    docs: list[str] = []
    for batch in iter_texts(corpus_dir, split, manifest):
        docs.extend(batch[: limit - len(docs)])
        if len(docs) >= limit:
            break
    return docs


def read_chats(folder: Path | None, limit: int) -> list[list[dict[str, str]]]:
    if folder is None or not (Path(folder) / "chat.jsonl").exists():
        return []
    lines = (Path(folder) / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines[:limit] if line.strip()]


def write_task(folder: Path, docs: list[str], relative: bool = False) -> None:
    """`heldout_text.yaml` + its data under `folder` (relative: the YAML names its data file by name only)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(_YAML.format(data=json.dumps(data.name if relative else str(data.resolve()))))


def canonical(models: dict[str, Path], docs: list[str], chats: list[list[dict[str, str]]],
              device: Any) -> dict[str, float]:
    """heldout/text_bpb/<model> and heldout/response_bpb/<model> (each with `_se`) for every model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.posttrain.hf_training import context_length

    metrics: dict[str, float] = {}
    for name, folder in models.items():
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()
        ctx = context_length(model) or 1024
        for what, values, fn in (("text", docs, text_bpb), ("response", chats, response_bpb)):
            if values:
                bpb, se = fn(model, tok, values, ctx)
                metrics[f"heldout/{what}_bpb/{name}"] = bpb
                metrics[f"heldout/{what}_bpb_se/{name}"] = se
        log.info("held-out bits per byte of the %s model: %s", name,
                 {k: round(v, 4) for k, v in metrics.items() if k.endswith(f"/{name}") and "_se" not in k})
    return metrics
