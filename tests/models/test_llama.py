import torch

from wmtp_fn.adapters import AdapterSpec, apply, init
from wmtp_fn.models.base import build_base, tiny_llama_config
from wmtp_fn.models.llama import HiddenStates, decoder_forward, right_padded
from tests.adapters.helpers import randomize


def test_unmasked_forward_equals_llama_model_exactly(plain, batch):
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(decoder_forward(plain.model, ids), plain.model(ids).last_hidden_state)


def test_left_padded_mask_goes_through_hf_masking(plain, batch):
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: HF's 4D mask is needed and used
    assert not right_padded(mask)
    with torch.no_grad():
        want = plain.model(ids, attention_mask=mask).last_hidden_state
        got = decoder_forward(plain.model, ids, mask)
        unmasked = decoder_forward(plain.model, ids)
    assert torch.equal(got, want)
    assert not torch.allclose(unmasked[1, 4:], want[1, 4:])


def test_right_padding_needs_no_mask(plain, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]  # row 1 right-padded from 9
    assert right_padded(mask) and right_padded(torch.ones_like(mask))
    with torch.no_grad():
        want = plain.model(ids, attention_mask=mask).last_hidden_state
        got = decoder_forward(plain.model, ids)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-6, atol=1e-6)


def test_right_padded_detects_holes_and_leading_zeros():
    assert not right_padded(torch.tensor([[1, 0, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1]]))
    assert right_padded(torch.tensor([[1, 1, 0], [1, 0, 0]]))


def test_hidden_states_view_binds_adapters_with_the_base_paths(base, batch):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0), seed=0)
    adapter = randomize(adapter, seed=1)
    with torch.no_grad():
        want = apply(base.model, adapter["model"], spec, input_ids=batch["input_ids"]).last_hidden_state
        got = apply(HiddenStates(base), adapter, spec, input_ids=batch["input_ids"])
    assert torch.equal(got, want)
    bare = build_base(tiny_llama_config(vocab_size=128), kind="model", seed=0)
    view = HiddenStates(bare)
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in bare.named_parameters()]


def test_eager_attention_stays_causal_and_equals_llama_model(batch):
    eager = build_base(tiny_llama_config(vocab_size=128, attn_implementation="eager"), seed=3)
    ids = batch["input_ids"]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 128
    with torch.no_grad():
        got = decoder_forward(eager.model, ids)
        assert torch.equal(got, eager.model(ids).last_hidden_state)
        later = decoder_forward(eager.model, changed)
    assert torch.equal(got[:, :-1], later[:, :-1])  # no position sees a later token
    assert not torch.equal(got[:, -1], later[:, -1])
