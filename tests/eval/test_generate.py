"""Generation through transformers' `generate` with an adapter bound equals the logits path.

- Greedy decoding of a left-padded batch equals, row by row, the argmax of `apply` over the
  whole sequence so far (no cache, no padding), on a Llama and on an MTP base (head 0).
- An all-linear adapter read back from every format gives the same tokens as the adapter in
  memory, and dropping its FFN weights changes them (so the comparison would see the seeds'
  FFN-dropping bug).
- Stop sequences end a row during generation, within a step of the stop, and cut the text.
- Sampling is reproducible by seed.

The tiny models run in float64, so argmax ties between the two paths cannot flip a token.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from transformers import AutoTokenizer, GenerationConfig

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, init, install_slots, to_flat
from wmtp_fn.formats import read_adapter
from wmtp_fn.adapters.lora import from_flat
from wmtp_fn.adapters.seeds_io import save_hf_lora
from wmtp_fn.data.embedded import embedded_tokenizer_path
from wmtp_fn.eval.generate import Sampling, generate, generate_samples, next_token_model
from wmtp_fn.models.base import Base, build_base, tiny_llama_config
from wmtp_fn.models.meta import save_seeds_policy
from wmtp_fn.models.mtp import mtp_from_llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    "def add(a, b):\n",
    'from typing import List\n\n\ndef mean(xs: List[float]) -> float:\n    """The mean."""\n',
    "x = 1\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_path()))


def tiny_llama(tokenizer, seed: int = 0) -> Base:
    cfg = tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    module = build_base(cfg, seed=seed, dtype=torch.float64)
    install_slots(module)
    return Base.of(module, "causal_lm")


def tiny_mtp(tokenizer) -> Base:
    llama = build_base(tiny_llama_config(vocab_size=len(tokenizer)), seed=1, dtype=torch.float64)
    module = mtp_from_llama(llama, 3)
    install_slots(module)
    return Base.of(module, "mtp")


def trained_like(base: Base, seed: int = 3, scale: float = 0.3):
    """An all-linear adapter with non-zero B (a fresh one is the identity)."""
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, targets=ALL), seed=0)
    gen = torch.Generator().manual_seed(seed)
    return adapter.apply(lambda t: torch.randn(t.shape, generator=gen) * scale), spec


def reference_greedy(base: Base, adapter, spec, tokenizer, prompt: str, steps: int) -> list[int]:
    """Argmax of the full forward (no cache) with the adapter applied, one token at a time."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    for _ in range(steps):
        logits = apply(base.module, adapter, spec, input_ids=ids)
        logits = logits if base.kind == "mtp" else logits.logits
        last = logits[0, -1, 0] if base.kind == "mtp" else logits[0, -1]  # MTP: head 0
        token = int(last.argmax())
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "bound"])
@pytest.mark.parametrize("kind", ["llama", "mtp"])
def test_greedy_generate_with_a_bound_adapter_equals_argmax_of_apply(tokenizer, kind, merge, cache):
    base = tiny_llama(tokenizer) if kind == "llama" else tiny_mtp(tokenizer)
    if kind == "llama":  # a checkpoint's own generation defaults must not leak into sampling
        base.module.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1)
    adapter, spec = trained_like(base)
    steps = 24
    weights = {n: p.clone() for n, p in base.module.named_parameters()}
    gens = generate(next_token_model(base), tokenizer, PROMPTS, Sampling(max_new_tokens=steps, batch_size=3, cache=cache),
                    base=base, adapter=(adapter, spec), merge=merge)
    assert all(torch.equal(p, weights[n]) for n, p in base.module.named_parameters())  # the base is as it was
    for prompt, got in zip(PROMPTS, gens):
        want = reference_greedy(base, adapter, spec, tokenizer, prompt, steps)
        assert list(got.token_ids) == want
        assert got.n_tokens == len(want)
    plain = generate(next_token_model(base), tokenizer, PROMPTS, Sampling(max_new_tokens=steps, batch_size=3))
    assert [g.token_ids for g in plain] != [g.token_ids for g in gens]  # the adapter was bound
    assert all(s.lora_A is None for s in base.module.modules() if hasattr(s, "lora_A"))  # and unbound after


def test_an_all_linear_adapter_from_every_format_generates_the_same(tokenizer, tmp_path):
    llama = tiny_llama(tokenizer)
    adapter, spec = trained_like(llama)
    checkpoint.save_params(tmp_path / "run" / "adapter", TensorDict({"lora": adapter}, batch_size=[]), {"lora": spec})
    save_hf_lora(tmp_path / "a.hf_lora.pt", adapter, spec)
    export_peft(adapter, spec, tmp_path / "peft")
    view, sampling = next_token_model(llama), Sampling(max_new_tokens=16, batch_size=3)

    def tokens(a, s, base=llama, v=view):
        return [g.token_ids for g in generate(v, tokenizer, PROMPTS, sampling, base=base, adapter=(a, s))]

    want = tokens(adapter, spec)
    for where in ("run", "run/adapter", "peft", "a.hf_lora.pt"):
        assert tokens(*read_adapter(tmp_path / where, llama)) == want, where
    attention_only = {k: v for k, v in to_flat(adapter).items() if "mlp" not in k}
    assert tokens(from_flat(attention_only), spec.replace(targets=ALL[:4])) != want  # FFN weights matter

    mtp = tiny_mtp(tokenizer)
    m_adapter, m_spec = trained_like(mtp)
    save_seeds_policy(tmp_path / "p.pt", to_flat(m_adapter), m_spec, mtp.module.config)
    m_view = next_token_model(mtp)
    m_want = tokens(m_adapter, m_spec, mtp, m_view)
    assert tokens(*read_adapter(tmp_path / "p.pt", mtp), mtp, m_view) == m_want
    m_attention = {k: v for k, v in to_flat(m_adapter).items() if "mlp" not in k}
    assert tokens(from_flat(m_attention), m_spec.replace(targets=ALL[:4]), mtp, m_view) != m_want


def test_a_stop_sequence_ends_its_row_during_generation(tokenizer):
    llama = tiny_llama(tokenizer)
    adapter, spec = trained_like(llama)
    view, steps = next_token_model(llama), 30
    free = generate(view, tokenizer, PROMPTS[:2], Sampling(max_new_tokens=steps), base=llama, adapter=(adapter, spec))
    assert all(g.finish == "length" and g.n_tokens == steps for g in free)
    # a stop: row 0's text of tokens 10..12, cut where it first occurs
    ids = list(free[0].token_ids)
    before, upto = tokenizer.decode(ids[:10]), tokenizer.decode(ids[:13])
    stop = upto[len(before):]
    assert stop and upto.startswith(before) and stop not in free[1].text
    first = free[0].text.index(stop)
    stopped = generate(view, tokenizer, PROMPTS[:2], Sampling(max_new_tokens=steps, stops=(stop,)),
                       base=llama, adapter=(adapter, spec))
    assert stopped[0].finish == "stop" and stopped[0].text == free[0].text[:first]
    # it stopped at the first step whose text contains the stop (greedy: same tokens up to there)
    ends = [n for n in range(1, steps + 1) if stop in tokenizer.decode(ids[:n])]
    assert stopped[0].n_tokens == ends[0] and stopped[0].token_ids == tuple(ids[: ends[0]])
    assert stopped[1] == free[1]  # the other row ran on to max_new_tokens


def test_the_cache_setting_reaches_transformers_and_auto_means_static_on_cuda_only():
    from wmtp_fn.errors import ConfigError
    from wmtp_fn.eval.generate import generation_config

    def impl(cache, device_type):
        return generation_config(Sampling(cache=cache), 2, 0, device_type).cache_implementation

    assert impl("auto", "cuda") == "static"
    assert impl("auto", "cpu") in (None, "dynamic")
    assert impl("static", "cpu") == "static"
    assert impl("dynamic", "cuda") in (None, "dynamic")
    with pytest.raises(ConfigError, match="cache must be one of"):
        Sampling(cache="paged")


def test_sampling_is_reproducible_by_seed(tokenizer):
    llama = tiny_llama(tokenizer)
    view = next_token_model(llama)
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, batch_size=4)

    def draw(seed):
        return [[g.token_ids for g in row] for row in generate_samples(view, tokenizer, PROMPTS, 3, sampling, seed=seed)]

    torch.manual_seed(0)
    a = draw(7)
    global_state = torch.random.get_rng_state()
    assert draw(7) == a
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the caller's RNG is untouched
    b = draw(8)
    assert b != a
    assert len({s for row in a for s in row}) > len(PROMPTS)  # samples of a prompt differ
    greedy = generate_samples(view, tokenizer, PROMPTS, 2, Sampling(max_new_tokens=12))
    assert all(row[0] == row[1] for row in greedy)
