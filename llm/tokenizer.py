"""The project's tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus a chat template, without transformers.

Folder layout (what `save_dir` writes and `Tokenizer.from_dir` / `transformers.AutoTokenizer.from_pretrained` read):
`tokenizer.json`, `tokenizer_config.json` (with `chat_template`, bos/eos/pad tokens), `special_tokens_map.json`.

Design choices:
* Byte-level BPE, so decode(encode(x)) == x for any Unicode text; no normalizer (it would break round-trips).
* Each digit is its own pre-token, which makes arithmetic learnable by small models.
* Special tokens are never produced from plain text: `encode` treats a literal "<|eos|>" in the text as ordinary
  characters. The chat template inserts special tokens by id, so a user message cannot inject a role marker.
* No BOS/EOS is added by `encode`; the chat template starts with BOS and ends assistant turns with `<|end|>`
  then EOS. Pretraining token shards put EOS between documents.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The Jinja template transformers renders. `Tokenizer.render_chat` is its Python twin (a test keeps them equal).
# The assistant turn, including its closing <|end|> and EOS, sits inside {% generation %} so TRL's
# assistant-only loss trains the model to produce the answer and to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' or message['role'] == 'system' %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "{{ raise_exception('chat role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# What a tokenizer folder holds; model folders (ours and transformers exports) carry a copy of these files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(tokenizer_dir: str | Path, dest: Path) -> None:
    """Copy a tokenizer folder into `dest` (created if needed); FileNotFoundError when it is not one."""
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src / 'tokenizer.json'} not found: tokenizer_dir must be a tokenizer folder "
                                "(tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
    shutil.copytree(src, dest, dirs_exist_ok=True)


def new_bpe() -> _HFTokenizer:
    """An untrained byte-level BPE with the project's pre-tokenizer and decoder."""
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None,
              show_progress: bool = True) -> _HFTokenizer:
    """Train the BPE from an iterator of texts (streamed; `tokenizers` batches it internally)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens (>= {len(SPECIAL_TOKENS) + 256})."
        )
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_dir(tok: _HFTokenizer, out_dir: str | Path, model_max_length: int = 1 << 20) -> None:
    """Write the tokenizer folder that both `Tokenizer.from_dir` and transformers' AutoTokenizer load.

    Plain writes: the caller builds the folder under a temporary name and renames it when complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers (which applies the post-processor unless told not to) then starts plain text with BOS, as
    # `llm-pipeline generate` and the chat template do, so both give the same tokens. Its apply_chat_template
    # tokenizes without special tokens, so a chat keeps the template's single BOS; this module never adds them.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        # transformers 5 maps this name to its tokenizers-backed class; no Python tokenizer code is needed.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {**specials, "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")


class Tokenizer:
    """Encode/decode and chat formatting on top of a `tokenizer.json`; no transformers needed."""

    def __init__(self, hf: _HFTokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; retrain it with the tokenizer stage.")
        self._tok = hf
        # Literal special-token strings in text are encoded as plain characters (no injection).
        self._tok.encode_special_tokens = True
        self.bos_id = self._id(BOS)
        self.eos_id = self._id(EOS)
        self.pad_id = self._id(PAD)
        self.end_id = self._id(END)
        self.role_ids = {role: self._id(tok) for role, tok in ROLES.items()}
        self.special_ids = frozenset(self._id(t) for t in SPECIAL_TOKENS)

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        assert i is not None
        return i

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}; pass the folder the tokenizer stage wrote.")
        return cls(_HFTokenizer.from_file(str(f)))

    @classmethod
    def from_hf(cls, hf: _HFTokenizer) -> Tokenizer:
        return cls(_HFTokenizer.from_str(hf.to_str()))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes on all cores (the Rust side parallelises the batch)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ------------------------------------------------------------------------------------------------- chat

    @staticmethod
    def _turns(messages: Sequence[dict]) -> Iterator[tuple[str, str]]:
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: chat role must be system, user or assistant, not {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            yield role, content

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, exactly as transformers renders CHAT_TEMPLATE."""
        out = [BOS]
        for role, content in self._turns(messages):
            out.append(ROLES[role] + content + END + (EOS if role == "assistant" else ""))
        if add_generation_prompt:
            out.append(ASSISTANT)
        return "".join(out)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, return_assistant_mask: bool = False
    ) -> list[int] | tuple[list[int], list[int]]:
        """Token ids of the chat; with `return_assistant_mask`, also a 0/1 mask of the assistant tokens
        (content + <|end|> + EOS, the `{% generation %}` span)."""
        ids = [self.bos_id]
        mask = [0]
        for role, content in self._turns(messages):
            ids.append(self.role_ids[role])
            mask.append(0)
            body = self.encode(content) + [self.end_id]
            if role == "assistant":
                body.append(self.eos_id)
            ids.extend(body)
            mask.extend([1 if role == "assistant" else 0] * len(body))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return (ids, mask) if return_assistant_mask else ids
