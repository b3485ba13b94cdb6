"""The MTP base: Meta's release format converted onto HF blocks equals Meta's own forward."""

import json
import math

import pytest
import torch

from wmtp_fn.models.meta import convert_meta, export_meta, ffn_hidden, hf_to_meta_rows, meta_to_hf_rows, meta_to_hf_state
from wmtp_fn.models.mtp import MTPLlama, load_mtp, mtp_from_llama

PARAMS = {"dim": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 61, "multiple_of": 16,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0, "n_future_tokens": 3}


def meta_state(params, gen):
    """Random weights in Meta's layout (`consolidated.pth` names)."""
    d, hd = params["dim"], params["dim"] // params["n_heads"]
    kv = params["n_kv_heads"] * hd
    f = ffn_hidden(d, params["multiple_of"], params["ffn_dim_multiplier"])

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])

    def block(prefix):
        return {f"{prefix}.attention.wq.weight": rnd(d, d), f"{prefix}.attention.wk.weight": rnd(kv, d),
                f"{prefix}.attention.wv.weight": rnd(kv, d), f"{prefix}.attention.wo.weight": rnd(d, d),
                f"{prefix}.feed_forward.w1.weight": rnd(f, d), f"{prefix}.feed_forward.w2.weight": rnd(d, f),
                f"{prefix}.feed_forward.w3.weight": rnd(f, d),
                f"{prefix}.attention_norm.weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
                f"{prefix}.ffn_norm.weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)}

    n_future = params["n_future_tokens"]
    state = {"tok_embeddings.weight": rnd(params["vocab_size"], d), "output.weight": rnd(params["vocab_size"], d),
             "norm.weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)}
    for i in range(params["n_layers"] - n_future + 1):
        state.update(block(f"layers.{i}"))
    for j in range(n_future - 1):
        state.update(block(f"extra_heads.{j}"))
    return state


def meta_forward(state, params, tokens, lora=None, scale=1.0):
    """An independent float64 implementation of Meta's MTP forward (complex-pair RoPE).
    lora: optional {meta linear name: (A [r, in], B [out, r])} added as x Aᵀ Bᵀ · scale."""
    d, nh, nkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd, T = d // nh, tokens.shape[1]
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def lin(name, x):
        y = x @ state[name + ".weight"].T
        if lora and name in lora:
            a, b = lora[name]
            y = y + scale * (x @ a.T @ b.T)
        return y

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * w

    def rope(x):  # x: [B, T, h, hd], adjacent pairs are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[None, :, None, :]).reshape(x.shape)

    def block(p, x):
        h = norm(x, state[f"{p}.attention_norm.weight"])
        B = x.shape[0]
        q = rope(lin(f"{p}.attention.wq", h).view(B, T, nh, hd))
        k = rope(lin(f"{p}.attention.wk", h).view(B, T, nkv, hd))
        v = lin(f"{p}.attention.wv", h).view(B, T, nkv, hd)
        k, v = (t.repeat_interleave(nh // nkv, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, d)
        x = x + lin(f"{p}.attention.wo", att)
        h = norm(x, state[f"{p}.ffn_norm.weight"])
        ff = torch.nn.functional.silu(lin(f"{p}.feed_forward.w1", h)) * lin(f"{p}.feed_forward.w3", h)
        return x + lin(f"{p}.feed_forward.w2", ff)

    n_trunk = params["n_layers"] - params["n_future_tokens"] + 1
    x = state["tok_embeddings.weight"][tokens]
    for i in range(n_trunk - 1):
        x = block(f"layers.{i}", x)
    heads = [f"layers.{n_trunk - 1}"] + [f"extra_heads.{j}" for j in range(params["n_future_tokens"] - 1)]
    outs = [norm(block(p, x), state["norm.weight"]) @ state["output.weight"].T for p in heads]
    return torch.stack(outs, dim=2)  # [B, T, H, V]


@pytest.fixture
def release(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = meta_state(PARAMS, gen)
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(PARAMS))
    torch.save(state, src / "consolidated.pth")
    return src, state


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_ffn_width_of_the_7b_release():
    assert ffn_hidden(4096, 256, None) == 11008


def test_row_permutation_is_the_pair_to_half_layout_and_inverts():
    w = torch.arange(8.0).reshape(8, 1)  # two heads of head_dim 4
    assert meta_to_hf_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = torch.randn(12, 5)
    assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(x, 3), 3), x)


def test_converted_release_equals_metas_forward(release, tmp_path):
    src, state = release
    model = load_mtp(convert_meta(src, tmp_path / "mtp"), dtype=torch.float64)
    assert isinstance(model, MTPLlama) and model.n_future == 3 and len(model.extra_heads) == 2
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    ref = meta_forward(state, PARAMS, tokens)
    assert ours.shape == (2, 9, 3, PARAMS["vocab_size"])
    assert rel(ours, ref) < 1e-5


def test_project_to_meta_to_project_is_exact(release, tmp_path):
    src, _ = release
    model = load_mtp(convert_meta(src, tmp_path / "a"))
    again = load_mtp(convert_meta(export_meta(model, tmp_path / "meta_again"), tmp_path / "b"))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_an_adapter_converted_between_layouts_gives_the_same_logits(release, tmp_path):
    from wmtp_fn.adapters import AdapterSpec, apply, install_slots

    src, state = release
    model = load_mtp(convert_meta(src, tmp_path / "mtp"), dtype=torch.float64)
    install_slots(model)
    gen = torch.Generator().manual_seed(2)
    r, alpha = 2, 4.0
    lora_meta = {}
    for name, w in state.items():
        if any(f".{n}." in name for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
            lin = name.removesuffix(".weight")
            lora_meta[lin] = (torch.randn(r, w.shape[1], generator=gen, dtype=torch.float64),
                              torch.randn(w.shape[0], r, generator=gen, dtype=torch.float64) * 0.1)
    flat_meta = {f"{k}.lora_A": a for k, (a, _) in lora_meta.items()} | {f"{k}.lora_B": b for k, (_, b) in lora_meta.items()}
    from tensordict import TensorDict

    adapter = TensorDict(meta_to_hf_state(flat_meta, model.config), batch_size=[]).unflatten_keys(".")
    spec = AdapterSpec(rank=r, alpha=alpha)
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 7), generator=gen)
    with torch.no_grad():
        ours = apply(model, adapter, spec, tokens)
    ref = meta_forward(state, PARAMS, tokens, lora=lora_meta, scale=alpha / r)
    assert rel(ours, ref) < 1e-5
    assert rel(ours, meta_forward(state, PARAMS, tokens)) > 1e-2  # the adapter does something


def test_an_mtp_base_from_a_llama_keeps_its_next_token_head(base):
    torch.manual_seed(0)
    mtp = mtp_from_llama(base, n_future=3)
    ids = torch.randint(4, 100, (2, 8))
    with torch.no_grad():
        logits = mtp(ids)
        ref = base(ids).logits
    assert torch.allclose(logits[:, :, 0], ref, atol=1e-5, rtol=1e-5)
    for k in (1, 2):  # extra heads start as copies of the last layer
        assert torch.allclose(logits[:, :, k], ref, atol=1e-5, rtol=1e-5)
    src = base.model.layers[-1].mlp.down_proj.weight
    assert mtp.extra_heads[0].mlp.down_proj.weight.data_ptr() != src.data_ptr()


def test_the_seeds_policy_checkpoint_loads_with_no_weight_dropped(release, tmp_path):
    from tensordict import TensorDict

    from wmtp_fn.adapters import apply, install_slots, validate
    from wmtp_fn.models.meta import read_seeds_policy, save_seeds_policy

    src, state = release
    model = load_mtp(convert_meta(src, tmp_path / "mtp"), dtype=torch.float64)
    install_slots(model)
    gen = torch.Generator().manual_seed(3)
    lora = {}
    for name, w in state.items():
        if any(f".{n}." in name for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
            lin = name.removesuffix(".weight")
            lora[lin] = (torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen))
    seeds = {"checkpoint_type": "lora", "extra_heads_state_dict": {}, "value_head_state_dict": {},
             "lora_state_dict": {f"{k}.lora_A": a for k, (a, _) in lora.items()} | {f"{k}.lora_B": b for k, (_, b) in lora.items()},
             "lora_config": {"rank": 2, "alpha": 4}, "config": {"model": {"path": "x"}}, "epoch": 1.0,
             "train_metrics": {}, "val_metrics": {}, "td_ema_state": None, "optimizer_state_dict": {}}
    torch.save(seeds, tmp_path / "policy.pt")
    flat, spec, meta = read_seeds_policy(tmp_path / "policy.pt", model.config)
    assert spec.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(flat) == len(seeds["lora_state_dict"]) and meta["epoch"] == 1.0
    adapter = TensorDict(flat, batch_size=[]).unflatten_keys(".")
    validate(adapter, spec, model, check_base=False)  # every slot of trunk and heads, nothing extra
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 6), generator=gen)
    lora64 = {k: (a.double(), b.double()) for k, (a, b) in lora.items()}
    with torch.no_grad():
        assert rel(apply(model, adapter.double(), spec, tokens), meta_forward(state, PARAMS, tokens, lora=lora64, scale=2.0)) < 1e-5
    save_seeds_policy(tmp_path / "again.pt", flat, spec, model.config, epoch=2.0)
    flat2, spec2, _ = read_seeds_policy(tmp_path / "again.pt", model.config)
    assert spec2 == spec and all(torch.equal(flat2[k], v) for k, v in flat.items())
    attention_only = {k: v for k, v in seeds["lora_state_dict"].items() if ".attention." in k}
    torch.save({**seeds, "lora_state_dict": attention_only}, tmp_path / "attn.pt")
    assert read_seeds_policy(tmp_path / "attn.pt", model.config)[1].targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    torch.save({**seeds, "lora_state_dict": {"layers.0.attention.wq.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="is not a Meta-named LoRA leaf"):
        read_seeds_policy(tmp_path / "bad.pt", model.config)
