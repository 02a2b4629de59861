"""The built-in world as a data source: its config (`BuiltinSource`), its pretraining stories, its task files and
the checker of its held-out answers. The one module outside `stages.world` that imports it (tests/test_layout.py):
generic code reaches the built-in world through this module and `stages.data.task_data` only."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.data.task_data import Checker
from stages.world import corpus as world
from stages.world import harmful

HARMFUL_KIND = world.HARMFUL  # held-out and RL items that must be refused
UNKNOWN_KIND = world.UNKNOWN  # questions the story does not answer
# The task-set sizes of the built-in source change the tasks folder only, not the corpus.
TASK_FIELDS = tuple(f.name for f in dataclasses.fields(world.TaskSpec))


class BuiltinSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["builtin"] = Field("builtin", description="The built-in world: synthetic stories for pretraining "
                                     "and task data (SFT, preference, RL and held-out sets) for post-training.")
    stories: bool = Field(True, description="Put the built-in stories into the pretraining corpus (false: only its "
                          "task data, beside your own pretraining text).")
    tasks: bool = Field(True, description="Write the built-in task data, which the post-training stages use for "
                        "every dataset left empty (false: only its stories).")
    seed: int = Field(0, description="Seed of the generator; the same seed gives byte-identical data.")
    filters: bool | None = Field(None, description="Apply ingest.quality and ingest.near_dedup (when enabled) to the "
                                 "built-in stories; unset: no (short templated stories would trip the length and "
                                 "duplicate rules).")
    n_documents: int = Field(12000, ge=1, description="Pretraining documents (~250 bytes each; 12000 is ~3 MB).")
    n_sft: int = Field(4000, ge=1, description="SFT chat examples (sft.jsonl), besides those unknown_share adds.")
    n_pref: int = Field(2000, ge=1, description="Preference pairs for the reward model (preferences.jsonl).")
    n_heldout: int = Field(1000, ge=1, description="Items in each held-out set (heldout, sft_eval, preferences_eval).")
    n_rl_prompts: int = Field(4000, ge=1, description="Training prompts for RL (rl_prompts.jsonl).")
    n_heldout_harmful: int = Field(world.N_HELDOUT_HARMFUL, ge=0, description="Harmful requests added to "
                                   "heldout.jsonl (phrasings and scenarios no training file uses).")
    harmful_share: float = Field(world.HARMFUL_SHARE, ge=0, le=1, description="Share of the SFT examples that are "
                                 "harmful requests about the built-in world.")
    sft_refusal_share: float = Field(world.SFT_REFUSAL_SHARE, ge=0, le=1, description="Share of those the SFT "
                                     "data answers with the refusal; the rest comply, so alignment has work to do.")
    rl_harmful_share: float = Field(world.RL_HARMFUL_SHARE, ge=0, le=1, description="Share of the RL prompts that "
                                    "are harmful requests.")
    unknown_share: float = Field(world.UNKNOWN_SHARE, ge=0, le=1, description="Questions about what the scenario "
                                 "does not state (answer: " f"{world.UNKNOWN_ANSWER!r}), added to the SFT and "
                                 "held-out files as this share of their size.")
    rl_unknown_share: float = Field(world.RL_UNKNOWN_SHARE, ge=0, le=1, description="The same, added to the RL "
                                    "prompts.")
    sft_honest_share: float = Field(world.SFT_HONEST_SHARE, ge=0, le=1, description="Share of those the SFT data "
                                    "answers honestly; the rest guess from the scenario.")


def documents(seed: int, n_documents: int) -> Iterator[str]:
    """The built-in pretraining stories, byte-identical for a seed."""
    return world.pretraining_documents(seed, n_documents)


def write_tasks(folder: Path, src: BuiltinSource) -> None:
    """The built-in task files (sft.jsonl, preferences.jsonl, rl_prompts.jsonl and their held-out sets) in `folder`."""
    world.write_tasks(folder, src.seed, **{name: getattr(src, name) for name in TASK_FIELDS})


def checker() -> Checker:
    """Held-out answers checked by program, harmful requests judged by whether they are refused."""
    return Checker(world.check_response, harmful.is_refusal, world.HARMFUL, "the built-in world's checker")
