# %% [markdown]
# # Where does the critic put weight?
#
# The verifiable pipeline weights each response token of the policy's loss by
# `w = clip(exp(Â/β), w_min, w_max)`, where `Â` is the whitened GAE advantage of a frozen
# critic's values (`wmtp_fn.losses.weighting`). This notebook trains a tiny critic (a short
# experiments/critic.py run over the MTP base the policy uses, `critic.mtp_n_future = 3`), reads
# its `adapter/` back as plain tensors, and for the correct solution and a failing mutant of the
# SAME problem computes the critic's values, the TD advantages and the weights token by token.
# It draws them over the source text side by side, plots the weight histograms of the control
# modes (critic, uniform, random, shuffled), and checks what each control promises.
#
# CPU, embedded tiny Llama, seconds. `BASE_PATH` switches to a real Llama directory.

# %%
BASE_PATH = ""  # "" = the embedded tiny Llama; else a HuggingFace Llama directory
N_FUTURE = 3  # the MTP base the critic reads (the verifiable policy's)
PROBLEM = "HumanEval/0"  # an embedded problem with a canonical solution and failing mutants
CRITIC_STEPS = 60  # a short critic run: enough for the values to leave the head's constant init
OUT = "runs/critic_weights"

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle

import wmtp_fn
from wmtp_fn import checkpoint
from wmtp_fn.adapters import install_slots
from wmtp_fn.config import apply_override, load_config
from wmtp_fn.data.collate import collate
from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.encode import encode
from wmtp_fn.data.schema import parse_record
from wmtp_fn.losses.ntp import IGNORE_INDEX
from wmtp_fn.losses.weighting import control_weights, td_advantages, validation_td_weights
from wmtp_fn.models.base import load_base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.objectives.critic import ADAPTER, HEAD, value_model
from wmtp_fn.pipelines.runner import load_tokenizer
from wmtp_fn.run import run_config

torch.set_num_threads(1)
EXPERIMENTS = Path(wmtp_fn.__file__).resolve().parents[1] / "experiments"

# %% [markdown]
# ## A short critic run
# Pairwise (Bradley-Terry) loss on (canonical, mutant) pairs of the embedded problems; the TD
# settings below are the verifiable experiment's own (`td.*`), so the weights are the ones a
# verifiable run would train with.

# %%
TINY = {"base.tiny_hidden_size": "64", "base.tiny_layers": "1", "data.max_length": "320", "data.too_long": "skip",
        "train.batch_size": "4", "train.micro_batch_size": "4", "critic.val_n_pairs": "4", "lora.rank": "4",
        "critic.head.dropout": "0.0", "export.hf_lora": "false"}
cfg = load_config(EXPERIMENTS / "critic.py")
for key, text in {"base.path": BASE_PATH, "critic.mtp_n_future": str(N_FUTURE), "train.steps": str(CRITIC_STEPS),
                  "train.eval_every": "0", "train.save_every": "0", "train.log_every": "5",
                  "out_dir": f"{OUT}/critic", "device": "cpu", "dtype": "float32", **({} if BASE_PATH else TINY)}.items():
    apply_override(cfg, key, text)
critic_run = run_config(cfg)
td = load_config(EXPERIMENTS / "verifiable.py").td
print("critic run", critic_run.out_dir, "| td:", {k: td[k] for k in ("gamma", "lam", "beta", "w_min", "w_max")})

# %% [markdown]
# ## The critic as data
# `adapter/` holds two subtrees: the critic's LoRA over the MTP base (`critic`) and the value
# head (`value_head`). `value_model` binds them over one MTP base made from the Llama.

# %%
params, specs, _ = checkpoint.load_params(critic_run.adapter_dir)
print({name: type(spec).__name__ for name, spec in specs.items()})
mtp = mtp_from_llama(load_base(BASE_PATH or critic_run.out_dir / "base"), N_FUTURE).eval()
install_slots(mtp)
values_of = value_model(mtp, specs[ADAPTER], specs[HEAD])

# %% [markdown]
# ## A correct and a mutated solution of the same problem

# %%
records = [parse_record(json.loads(line)) for line in embedded_dataset_path().read_text().splitlines()]
correct = next(r for r in records if r.problem_id == PROBLEM and r.is_correct)
mutant = next(r for r in records if r.problem_id == PROBLEM and not r.is_correct)
tokenizer = load_tokenizer(cfg.data, BASE_PATH)
examples = [encode(r, tokenizer, max_length=cfg.data.max_length, use_chat_template=cfg.data.use_chat_template)
            for r in (correct, mutant)]
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
batch = collate(examples, pad_id=pad_id)
ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
mask = (labels != IGNORE_INDEX) & attention.bool()  # [2, T]: the response tokens (and EOS)
print("batch", tuple(ids.shape), "response tokens", mask.sum(dim=1).tolist())

# %% [markdown]
# ## Values, TD advantages, weights
# `td_advantages`: `δ_t = γ v_t − v_{t−1}`, GAE over the response. `validation_td_weights`
# whitens with the two sequences' own mean and std (a training step uses the running ones).

# %%
with torch.no_grad():
    values = values_of(params, ids, attention)  # [2, T]
adv = td_advantages(values, mask, gamma=td.gamma, lam=td.lam, initial_value=td.initial_value,
                    mc_at_lambda_one=td.mc_at_lambda_one)  # [2, T]
weights, mu, sigma = validation_td_weights(adv, mask, beta=td.beta, w_min=td.w_min, w_max=td.w_max)  # [2, T]
for name, row in (("correct", 0), ("mutant", 1)):
    m = mask[row]
    print(f"{name:8s} mean v {values[row][m].mean():+.4f}  mean w {weights[row][m].mean():.3f}  "
          f"min w {weights[row][m].min():.3f}  max w {weights[row][m].max():.3f}")
print(f"whitening μ {mu:.4g} σ {sigma:.4g}")

# %% [markdown]
# ## The weights over the source text
# Each response token is drawn in a box coloured by its weight (the colour bar spans
# `[w_min, w_max]`), laid out as the code is: a token's text starts where the previous one ended,
# newlines start a new line. EOS is the last box.

# %%
def token_pieces(token_ids: list[int]) -> list[str]:
    """The text each token adds to the decoded prefix (so multi-byte and merged pieces line up)."""
    pieces, text = [], ""
    for i in range(len(token_ids)):
        longer = tokenizer.decode(token_ids[: i + 1])
        pieces.append(longer[len(text):] if longer.startswith(text) else tokenizer.decode(token_ids[i:i + 1]))
        text = longer
    return pieces


def draw_tokens(ax, pieces: list[str], w: list[float], norm, cmap, title: str) -> None:
    """`pieces` laid out as source text (x in characters, y in lines), each in a box of colour `w`."""
    x = y = 0
    width = 1
    for piece, weight in zip(pieces, w):
        piece = piece or "⟨eos⟩"
        for k, part in enumerate(piece.split("\n")):
            if k:
                x, y = 0, y + 1
            if part:
                ax.add_patch(Rectangle((x, -y - 0.45), len(part), 0.9, facecolor=cmap(norm(weight)),
                                       edgecolor="white", linewidth=0.5))
                ax.text(x, -y, part, fontsize=7, family="monospace", va="center", ha="left")
                x += len(part)
                width = max(width, x)
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(-y - 1, 1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


cmap, norm = plt.get_cmap("coolwarm"), Normalize(td.w_min, td.w_max)
fig, axes = plt.subplots(1, 2, figsize=(16, 4.5))
for ax, row, name in zip(axes, (0, 1), ("correct (canonical)", "mutant (fails the tests)")):
    positions = mask[row].nonzero().flatten()
    pieces = token_pieces(ids[row, positions].tolist())
    draw_tokens(ax, pieces, weights[row, positions].tolist(), norm, cmap,
                f"{PROBLEM} {name}: mean w {weights[row, positions].mean():.2f}")
fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.02, label="TD weight")
Path(OUT).mkdir(parents=True, exist_ok=True)
fig.savefig(Path(OUT) / "token_weights.png", dpi=110, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The control modes
# uniform trains every response token with weight 1; random draws LogNormal weights with the
# critic weights' mean and std; shuffled permutes the critic's weights within each sequence's
# response: the same amount of reweighting, not the critic's choice of tokens.

# %%
generator = torch.Generator().manual_seed(0)
controls = {mode: control_weights(mode, weights, mask, attention_mask=attention, random_matched=td.random_matched,
                                  shuffle_scope="response", w_min=td.w_min, w_max=td.w_max, generator=generator)
            for mode in ("critic", "uniform", "random", "shuffled")}
fig, axes = plt.subplots(1, len(controls), figsize=(14, 3), sharey=True)
top = 2 * td.w_max  # random's LogNormal is not clipped: its tail goes into the last bin
bins = torch.linspace(0, top, 31).numpy()
for ax, (mode, w) in zip(axes, controls.items()):
    for row, name in ((0, "correct"), (1, "mutant")):
        ax.hist(w[row][mask[row]].clamp(max=top).numpy(), bins=bins, alpha=0.6, label=name)
    ax.set_title(f"{mode}: mean {w[mask].mean():.2f}, std {w[mask].std():.2f}, max {w[mask].max():.1f}", fontsize=9)
    ax.set_xlabel(f"weight (last bin: ≥ {top:g})")
axes[0].set_ylabel("response tokens")
axes[0].legend()
fig.tight_layout()
fig.savefig(Path(OUT) / "control_histograms.png", dpi=100)
plt.show()

# %% [markdown]
# ## Checks
# The critic weights lie in `[w_min, w_max]` on response tokens and are exactly 0 elsewhere;
# uniform is exactly the response mask; shuffled keeps each sequence's multiset of response
# weights (sorted values equal) and zeros elsewhere; the critic's values are not constant (the
# short run moved the head off its init), so the weights are not all equal. The critic is causal:
# on the tokens the two solutions share before the mutation its values agree (the weights need
# not, since GAE looks ahead).

# %%
w = controls["critic"]
assert torch.equal(w, weights)
assert ((w[mask] >= td.w_min) & (w[mask] <= td.w_max)).all()
assert (w[~mask] == 0).all()
assert torch.equal(controls["uniform"], mask.to(w.dtype))
for row in range(w.shape[0]):
    assert torch.equal(controls["shuffled"][row][mask[row]].sort().values, w[row][mask[row]].sort().values), row
assert (controls["shuffled"][~mask] == 0).all()
assert not torch.equal(controls["shuffled"], w), "a shuffle that moves nothing"
assert (controls["random"][~mask] == 0).all() and (controls["random"][mask] > 0).all()
assert values[mask].std() > 0 and w[mask].std() > 0
same = (ids[0] == ids[1]).long().cumprod(dim=0).bool()  # [T]: the shared prefix
assert mask[0][same].any() and not same.all(), "the mutant shares a response prefix, then differs"
torch.testing.assert_close(values[0][same], values[1][same])
print("checks passed")
