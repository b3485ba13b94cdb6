"""Sampling completions from a frozen base with an adapter bound (or none), through transformers'
own ``generate``: KV cache, temperature / top-p / greedy, EOS, and the benchmark's stop
sequences checked *during* generation, row by row.

    view = next_token_model(base)                      # once per base
    gens = generate(view, tokenizer, prompts, Sampling(max_new_tokens=512, temperature=0.8,
                    top_p=0.95, stops=HUMANEVAL_STOPS), base=base, adapter=(adapter, spec), seed=0)

Why a view: ``generate`` runs a ``LlamaForCausalLM``. For a Llama base the view is that model's
own decoder and unembedding; for an MTP base (``models.mtp``) it is the trunk + head 0 (the
last block of ``model.layers``) + the shared norm and unembedding, which *is* a Llama of
``n_layers - n_future + 1`` layers: head 0 is the next-token model. The view shares the base's
modules (no weight is copied), so an adapter bound on the base with ``adapters.bound`` is bound
in the view too: the slots read their bound tensors at every forward, prefill and cached steps
alike. The view carries a blank ``generation_config``, so nothing of a checkpoint's
``generation_config.json`` (a top-k, a repetition penalty) changes the sampling behind the
caller's back.

Reproducibility: rows are generated in a fixed order (prompts sorted by token length, longest
first, in batches of ``Sampling.batch_size``), each batch under its own RNG seeded from
``(seed, batch index)``, in a forked RNG (the caller's global RNG is untouched). The same
prompts, settings and seed give the same samples; greedy decoding ignores the seed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wmtp_fn.errors import ConfigError
from wmtp_fn.eval.extract import first_stop

FINISH_REASONS = ("eos", "stop", "length")
CACHES = ("auto", "dynamic", "static")
# A stop sequence can begin at most this many tokens before the newest one when every token
# decodes to at least one character; the window is searched after each step.
_WINDOW_SLACK = 8


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled. temperature 0 = greedy (top_p ignored); stops: strings that
    end a completion (not included in it); batch_size: rows per ``generate`` call; cache:
    transformers' KV cache, ``"dynamic"`` (grows by concatenation), ``"static"`` (preallocated
    to prompt + max_new_tokens; on a GPU transformers then compiles the decoding step: about 2×
    the tokens/s on an H200, BENCHMARKS.md) or ``"auto"``: static on CUDA, dynamic elsewhere."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    batch_size: int = 16
    cache: str = "auto"

    def __post_init__(self) -> None:
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ConfigError(f"stops must be non-empty strings, got {list(self.stops)!r}")
        if self.cache not in CACHES:
            raise ConfigError(f"cache must be one of {CACHES}, got {self.cache!r}")


@dataclass(frozen=True)
class Generation:
    """One generated completion: ``text`` (decoded, without the prompt, cut before the first
    stop sequence; no EOS), ``n_tokens`` generated (the EOS or the stop's tokens included),
    ``finish`` in FINISH_REASONS, ``token_ids`` those ``n_tokens`` tokens."""

    text: str
    n_tokens: int
    finish: str
    token_ids: tuple[int, ...] = ()


# --- the causal-LM view -----------------------------------------------------------------------


def next_token_model(base) -> nn.Module:
    """A ``LlamaForCausalLM`` sharing ``base``'s next-token modules (see the module docstring).

    base: a ``models.base.Base`` (kind ``causal_lm`` or ``mtp``) or such a module.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    from wmtp_fn.models.mtp import MTPLlama

    module = base if isinstance(base, nn.Module) else base.module
    if isinstance(module, MTPLlama):
        config = module.model.config  # the trunk + head 0 as a Llama
    elif isinstance(module, LlamaForCausalLM):
        config = module.config
    else:
        raise ValueError(
            f"generation needs a LlamaForCausalLM or an MTP base, got {type(module).__name__} "
            "(load the base as a causal LM)"
        )
    config = copy.deepcopy(config)
    config._attn_implementation = module.model.config._attn_implementation
    with torch.device("meta"):
        view = LlamaForCausalLM(config)
    view.model, view.lm_head = module.model, module.lm_head
    view.generation_config = GenerationConfig()
    return view.eval()


# --- stopping during generation ---------------------------------------------------------------


def _stopping_criterion(prompt_len: int, stops: Sequence[str], eos_id: int, tokenizer):
    """A transformers ``StoppingCriteria`` that ends each row at EOS or at its first stop
    sequence and records where: ``.finished[row] = (n_tokens, reason)``."""
    from transformers import StoppingCriteria

    window = max((len(s) for s in stops), default=0) + _WINDOW_SLACK

    class StopAtSequences(StoppingCriteria):
        def __init__(self) -> None:
            self.finished: dict[int, tuple[int, str]] = {}

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            """input_ids: [B, prompt_len + generated] -> done: [B] bool."""
            n = input_ids.shape[1] - prompt_len
            last = input_ids[:, -1].tolist()
            rows = input_ids[:, max(prompt_len, input_ids.shape[1] - window):].tolist() if stops else None
            pending = []
            for row in range(input_ids.shape[0]):
                if row in self.finished:
                    continue
                if last[row] == eos_id:
                    self.finished[row] = (n, "eos")
                elif stops:
                    pending.append(row)
            # one batched decode per step (the tokenizer's own parallel path), not one per row
            texts = tokenizer.batch_decode([rows[r] for r in pending], skip_special_tokens=True) if pending else []
            for row, text in zip(pending, texts):
                if first_stop(text, stops) is not None:
                    self.finished[row] = (n, "stop")
            done = [row in self.finished for row in range(input_ids.shape[0])]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopAtSequences()


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after ``prompt_ids``: decoded together and the prompt's text
    removed, so a tokenizer that drops a leading space when decoding a lone continuation
    (SentencePiece) cannot shift the completion's indentation."""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


# --- generation -------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """The RNG seed of one batch: independent streams for every (seed, batch) pair."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def generation_config(sampling: Sampling, eos_id: int, pad_id: int, device_type: str = "cpu"):
    """Plain temperature + top-p sampling: transformers' default top-k (50) is switched off
    explicitly, the rest of the blank config is neutral. device_type resolves ``cache="auto"``."""
    from transformers import GenerationConfig

    cache = sampling.cache if sampling.cache != "auto" else ("static" if device_type == "cuda" else "dynamic")
    common = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=0, num_beams=1, eos_token_id=eos_id,
                  pad_token_id=pad_id, use_cache=True, repetition_penalty=1.0, no_repeat_ngram_size=0,
                  cache_implementation=None if cache == "dynamic" else cache)
    if sampling.temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, **common,
    )


@torch.no_grad()
def _generate_batch(view: nn.Module, tokenizer, prompt_ids: list[list[int]], sampling: Sampling,
                    seed: int) -> list[Generation]:
    """One left-padded batch through ``view.generate``."""
    device = next(view.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    criterion = _stopping_criterion(width, sampling.stops, eos_id, tokenizer)
    from transformers import StoppingCriteriaList

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = view.generate(
            input_ids=ids, attention_mask=mask,
            generation_config=generation_config(sampling, eos_id, pad_id, device.type),
            stopping_criteria=StoppingCriteriaList([criterion]),
        )
    gens = []
    for row, prompt in enumerate(prompt_ids):
        new = out[row, width:].tolist()
        n_tokens, finish = criterion.finished.get(row, (len(new), "length"))
        kept = new[: n_tokens - 1] if finish == "eos" else new[:n_tokens]
        text = _continuation(tokenizer, prompt, kept)
        cut = first_stop(text, sampling.stops)
        if cut is not None:
            text, finish = text[:cut], "stop"
        gens.append(Generation(text, n_tokens, finish, tuple(new[:n_tokens])))
    return gens


def generate(
    view: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    base=None,
    adapter=None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
    merge: bool = True,
) -> list[Generation]:
    """One completion per prompt (repeat a prompt for several samples), in input order.

    view: ``next_token_model(base)``. adapter: ``(adapter, spec)`` on ``base`` (the module or
    record the view was made from) for the whole call, or None for the base alone: merged into
    the weights for the call (``adapters.merged_into``: one matmul per linear, the base's tensors
    untouched) or, with ``merge=False``, bound into the slots (``adapters.bound``). The two
    agree up to the rounding of the merged weight (exactly in fp64).
    Prompts are tokenized with the tokenizer's special tokens (a BOS where it adds one).
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer needs an EOS and a pad token for batched generation")
    if adapter is not None and base is None:
        raise ValueError("generate: an adapter needs the base it binds to (base=...)")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # stable: ties keep input order
    batches = [order[i: i + sampling.batch_size] for i in range(0, len(order), sampling.batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="sample")
    results: dict[int, Generation] = {}

    def run_all() -> None:
        for b, rows in enumerate(batches):
            got = _generate_batch(view, tokenizer, [encoded[i] for i in rows], sampling, batch_seed(seed, b))
            results.update(zip(rows, got))
            if bar is not None:
                bar.update(len(rows))

    try:
        if adapter is None:
            run_all()
        else:
            from wmtp_fn.adapters import bound, merged_into

            module = base if isinstance(base, nn.Module) else base.module
            with (merged_into if merge else bound)(module, adapter[0], adapter[1]):
                run_all()
    finally:
        if bar is not None:
            bar.close()
    return [results[i] for i in range(len(prompts))]


def generate_samples(
    view: nn.Module, tokenizer, prompts: Sequence[str], n: int, sampling: Sampling, **kwargs
) -> list[list[Generation]]:
    """``n`` completions of each prompt: ``[len(prompts)][n]`` (keyword arguments as ``generate``)."""
    if type(n) is not int or n < 1:
        raise ConfigError(f"n_samples must be an int >= 1, got {n!r}")
    flat = generate(view, tokenizer, [p for p in prompts for _ in range(n)], sampling, **kwargs)
    return [flat[i * n: (i + 1) * n] for i in range(len(prompts))]
