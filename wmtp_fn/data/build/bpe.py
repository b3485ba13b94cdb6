"""Training a small byte-level BPE tokenizer and saving it as a HuggingFace tokenizer directory.

Byte-level: every byte has a token, so any text encodes without ``<unk>`` and decodes back
exactly. ``add_prefix_space=False`` keeps a response's leading indentation as is (the encoder
tokenises prompt and response separately). Special tokens take ids 0-3 in this order:
``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), ``<pad>``. Plain calls (``tokenizer(text)``) prepend
BOS, as Llama's tokenizer does; the encoder asks for ``add_special_tokens=False`` and adds BOS
itself. Training is deterministic for a fixed input order (checked by rebuilding).

The directory holds ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``,
written here rather than by ``save_pretrained`` so the files do not depend on the installed
transformers version; ``AutoTokenizer.from_pretrained`` loads it as a
``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK, BOS, EOS, PAD = SPECIAL_TOKENS


def train_bpe(texts: Iterable[str], *, vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` trained on ``texts`` (in the given order)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str, *, model_max_length: int = 2048) -> None:
    """Write the three files of a HuggingFace fast-tokenizer directory."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(tokenizer.to_str(pretty=True))
        f.write("\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    _write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
        },
    )
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)
