"""NTP loss vs HuggingFace's LlamaForCausalLM loss (logits path and chunked hidden path),
masking, all-masked batches, and a float64 loop reference."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_fn.losses.ntp import ntp_count, ntp_loss, ntp_sums, ntp_sums_from_hidden, shift_targets

V = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def batch(padding_side: str, seed: int = 0):
    """Prompt-masked, padded batch as the data layer makes it: prompt and padding labels -100."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 16
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = [16, 11, 7, 13]
    prompt = [5, 3, 6, 2]
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        mask[b, sl] = 1
        start = sl.start
        labels[b, start + p:start + n] = ids[b, start + p:start + n]
    return ids, mask, labels


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_hf_loss_logits_and_hidden(model, padding_side):
    ids, mask, labels = batch(padding_side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    s, c = ntp_sums(out.logits, labels)
    # every label has a predicting position (prompt length >= 1), so count = Σ (length − prompt)
    assert c.dtype == torch.int64 and int(c) == sum(n - p for n, p in zip([16, 11, 7, 13], [5, 3, 6, 2]))
    torch.testing.assert_close(s / c, out.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ntp_loss(out.logits, labels), out.loss, rtol=1e-6, atol=0)
    for chunk in (5, 16, 4096):
        s2, c2 = ntp_sums_from_hidden(hidden, model.lm_head.weight, labels, chunk_size=chunk)
        assert int(c2) == int(c)
        torch.testing.assert_close(s2 / c2, out.loss, rtol=1e-6, atol=0)
    assert torch.equal(ntp_count({"labels": labels}), c.reshape(1))


def test_hidden_path_gradients_match_hf(model):
    ids, mask, labels = batch("right", seed=1)
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight]
    ref = torch.autograd.grad(model(input_ids=ids, attention_mask=mask, labels=labels).loss, params)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    s, c = ntp_sums_from_hidden(hidden, model.lm_head.weight.detach(), labels, chunk_size=7)
    got = torch.autograd.grad(s / c, params)
    for a, b in zip(got, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_all_masked_is_finite_zero_with_zero_grads():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, requires_grad=True)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(V, 8)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # a label at position 0 is never a target (nothing predicts it)
    s, c = ntp_sums(logits, labels)
    s2, c2 = ntp_sums_from_hidden(hidden, w, labels, chunk_size=3)
    for total, count in ((s.detach(), c), (s2.detach(), c2)):
        assert total.item() == 0.0 and int(count) == 0 and math.isfinite(total.item())
    assert ntp_loss(logits, labels).item() == 0.0
    (s + s2 + ntp_loss(logits, labels)).backward()
    assert not logits.grad.any() and not hidden.grad.any()
    assert int(ntp_count({"labels": labels})) == 0


def test_shift_targets_golden():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [1, 2, 3, 4, 5]])
    assert shift_targets(labels).tolist() == [[-100, 7, 8, -100, -100], [2, 3, 4, 5, -100]]


def test_shape_errors():
    with pytest.raises(ValueError):
        ntp_sums(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        ntp_sums_from_hidden(torch.zeros(2, 5, 3), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 9),
    v=st.integers(2, 20),
    d=st.integers(1, 8),
    chunk=st.integers(1, 40),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_property_matches_loop_reference(b, t, v, d, chunk, keep, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    w = torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) > keep] = -100
    # float64 loop straight from the definition: position i predicts labels[:, i + 1]
    logits64 = hidden.double() @ w.double().T
    ref_sum, ref_count = 0.0, 0
    for bi in range(b):
        for i in range(t - 1):
            y = int(labels[bi, i + 1])
            if y != -100:
                ref_sum += float(torch.logsumexp(logits64[bi, i], 0) - logits64[bi, i, y])
                ref_count += 1
    s, c = ntp_sums((hidden @ w.T), labels)
    s2, c2 = ntp_sums_from_hidden(hidden, w, labels, chunk_size=chunk)
    assert int(c) == int(c2) == ref_count == int(ntp_count({"labels": labels}))
    for total in (s, s2):
        assert float(total) == pytest.approx(ref_sum, rel=1e-5, abs=1e-4)
