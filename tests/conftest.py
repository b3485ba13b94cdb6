"""Shared fixtures: a tiny random Llama written with `save_pretrained`, so tests exercise the
real loading path (`from_pretrained`) instead of in-memory shortcuts."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from wmtp_fn.adapters import install_slots
from wmtp_fn.models.base import build_base, load_base, tiny_llama_config

VOCAB = 128

# Property tests draw the same examples on every run (CI must not turn red by luck); set
# HYPOTHESIS_PROFILE=explore locally to search new examples.
settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=200, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory of a tiny random LlamaForCausalLM (fp32), written by `save_pretrained`."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_base(tiny_llama_config(vocab_size=VOCAB), seed=1234).save_pretrained(path)
    return path


@pytest.fixture
def plain(tiny_dir):
    """The tiny model as HuggingFace loads it, untouched."""
    return load_base(tiny_dir)


@pytest.fixture
def base(tiny_dir):
    """The tiny model with LoRA slots on all seven linears."""
    model = load_base(tiny_dir)
    install_slots(model)
    return model


@pytest.fixture
def batch():
    """A small batch of token ids with right padding on the second row."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}
