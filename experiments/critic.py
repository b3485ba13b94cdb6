"""critic: train a value model (critic adapter + value head) on (correct, incorrect) pairs of the same problem (docs/losses-critic-td.md).

The defaults are the embedded demo: the tiny random Llama and the bundled HumanEval-derived
code data (each canonical solution paired with its failing mutants), pairwise (Bradley-Terry)
loss, on the CPU. For the seeds' production critic, point `base.path` at Sheared-LLaMA-2.7B
and use `lora.rank=32, lora.alpha=64, lora.dropout=0.1`, `optim.lr=2e-5`,
`critic.head.lr_ratio=5` (head lr 1e-4), `optim.weight_decay=0.01`, `optim.betas=(0.9, 0.95)`,
`critic.pairing=seeds_length_balanced`, `seed=84`. Add `--config.critic.mtp_n_future=4` to
train the critic over the MTP base a verifiable run's policy uses:

    python -m wmtp_fn --config experiments/critic.py --config.train.steps=300
"""

from ml_collections import ConfigDict

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.pipeline = "critic"  # which pipeline runs this config (wmtp_fn/pipelines/)
    c.seed = 42  # the one seed: data split and sampling, adapter init, dropout
    c.out_dir = "runs/critic"  # the run directory; rerunning with the same one resumes
    c.device = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    c.dtype = "auto"  # compute dtype of the frozen base: "auto" = bfloat16 on GPU, float32 on CPU

    c.base = ConfigDict()
    c.base.path = ""  # a HuggingFace Llama directory; "" = build the embedded tiny Llama
    c.base.tiny_hidden_size = 256  # the embedded tiny Llama's shape (ignored with a path)
    c.base.tiny_layers = 2  # decoder layers of the embedded tiny Llama
    c.base.compile = False  # torch.compile each decoder layer (GPU)
    c.base.activation_memory_budget = 1.0  # with compile: < 1 recomputes cheap activations to save memory
    c.base.activation_checkpointing = False  # recompute each layer in the backward (less memory)
    c.base.quantize = ""  # "nf4": QLoRA, the frozen linears in 4-bit NF4 (docs/qlora.md; needs the quant extra)

    c.critic = ConfigDict()
    c.critic.loss = "pairwise"  # "pairwise" (Bradley-Terry on mean values) | "lambda_return" (regression to λ-returns)
    c.critic.use_lora = True  # false: train the value head alone over the frozen backbone (no critic adapter)
    c.critic.mtp_n_future = 0  # 0: the Llama base as is; >= 2: the MTP base of the policy pipelines (one base for both)
    c.critic.pairing = "random"  # "random" | "length_balanced" | "seeds" | "seeds_length_balanced" (docs/data.md)
    c.critic.max_pairs_per_problem = 60  # at most this many pairs of one problem
    c.critic.n_pairs = 0  # training pairs drawn; 0 = all
    c.critic.val_n_pairs = 0  # validation pairs (fixed); 0 = all
    c.critic.length_bucket = 32  # response tokens per bucket of "length_balanced"
    c.critic.value_loss = "mse"  # lambda_return: "mse" | "smooth_l1" (the seeds')
    c.critic.delta = 0.5  # smooth_l1's beta
    c.critic.gamma = 1.0  # lambda_return's discount
    c.critic.lam = ConfigDict()  # lambda_return's λ per step (validation: λ = 1)
    c.critic.lam.schedule = "constant"  # "constant" (start) | "linear" | "cosine" from start to end
    c.critic.lam.start = 1.0  # λ before and at the start of the decay (1 = Monte-Carlo)
    c.critic.lam.end = 0.95  # λ after the decay
    c.critic.lam.warmup_steps = 250  # steps at start before the decay
    c.critic.lam.decay_steps = 500  # steps from start to end
    c.critic.head = ConfigDict()
    c.critic.head.kind = "mlp"  # "linear" | "sigmoid" | "mlp" (d -> d/4 -> d/8 -> 1, GELU + dropout)
    c.critic.head.dropout = 0.0  # the mlp head's dropout in training (seeds: 0.2; on the tiny demo 0.2 collapses it)
    c.critic.head.bias_init = 0.0  # the last bias at init (0.5 for a Monte-Carlo critic)
    c.critic.head.lr_ratio = 10.0  # the head learns this many times faster than the adapter (seeds: 5, 1e-4 / 2e-5)

    c.data = ConfigDict()
    c.data.train_path = ""  # JSONL records (docs/data.md); "" = the embedded HumanEval data
    c.data.val_path = ""  # "" = hold out `val_fraction` of the train problems
    c.data.val_fraction = 0.1  # share of the (not held-out) problems used for validation
    c.data.heldout_fraction = 0.0  # share of the problems kept out of training and validation, to evaluate on
    c.data.heldout_seed = 0  # the held-out split's own seed (the same set for every run seed)
    c.data.tokenizer = ""  # a tokenizer directory; "" = the base's own, or the embedded one
    c.data.use_chat_template = False  # the tokenizer's chat template instead of Alpaca
    c.data.max_length = 768  # the embedded data: longest record 751 tokens
    c.data.pad_to_multiple_of = 64  # fewer distinct shapes (compiled layers) and tensor-core friendly
    c.data.too_long = "raise"  # a record whose prompt alone exceeds max_length: "raise" | "skip"
    c.data.difficulty_bins = ConfigDict({"all": [1, 25]})  # name -> inclusive [lo, hi] difficulty
    c.data.difficulty_weights = ConfigDict({"all": 1.0})  # name -> share of critic.n_pairs

    c.lora = ConfigDict()
    c.lora.rank = 16  # r: A is [r, in], B is [out, r]
    c.lora.alpha = 32.0  # scale alpha / r (alpha / sqrt(r) with rsLoRA)
    c.lora.dropout = 0.05  # on the LoRA input only
    c.lora.targets = ALL_TARGETS  # the linears that get an adapter, in every layer
    c.lora.use_rslora = False  # rank-stabilised scaling alpha / sqrt(r)
    c.lora.use_dora = False  # DoRA: a learned magnitude per output row

    c.optim = ConfigDict()
    c.optim.lr = 2e-3  # AdamW peak learning rate (of the critic adapter; the head: times critic.head.lr_ratio)
    c.optim.betas = (0.9, 0.999)  # AdamW moment decay rates
    c.optim.eps = 1e-8  # AdamW denominator epsilon
    c.optim.weight_decay = 0.0  # decoupled (AdamW) weight decay
    c.optim.loraplus_ratio = 1.0  # LoRA+: lora_B learns this many times faster
    c.optim.max_grad_norm = 1.0  # clip the global gradient norm; 0 = no clipping

    c.schedule = ConfigDict()
    c.schedule.kind = "cosine"  # "cosine" | "linear" | "constant", after a linear warmup
    c.schedule.warmup_steps = 10  # linear warmup from 0 to optim.lr
    c.schedule.min_lr_ratio = 0.1  # the decay ends at min_lr_ratio * optim.lr
    c.schedule.total_steps = 0  # where the decay ends; 0 = train.steps

    c.train = ConfigDict()
    c.train.steps = 200  # optimizer steps
    c.train.batch_size = 8  # pairs per optimizer step
    c.train.micro_batch_size = 8  # pairs per micro-batch (one [2P, T] forward); batch_size / micro_batch_size accumulated
    c.train.ce_chunk_size = 1024  # unused by the critic (no cross-entropy); kept so the train section reads alike
    c.train.nonfinite = "skip"  # "skip" (count it, stop after 10 in a row) | "raise"
    c.train.log_every = 10  # steps per metrics.jsonl row
    c.train.eval_every = 50  # steps between validations (0 = only at the start and the end)
    c.train.save_every = 50  # steps between checkpoints (0 = only at the end; Ctrl-C saves too)
    c.train.keep = 3  # newest checkpoints kept
    c.train.resume = "auto"  # "auto": continue from out_dir's latest checkpoint if any | "never"

    c.dist = ConfigDict()  # under torchrun (docs/distributed.md); ignored by a plain `python -m wmtp_fn`
    c.dist.shard = "full"  # "full": FSDP2 shards the frozen base over the ranks; "replicate": every rank holds it all
    c.dist.reshard_after_forward = True  # free a layer's gathered weights after its forward (gather again in backward)
    c.dist.check_every = 50  # steps between checks that every rank holds identical trainable params (0 = never)

    c.export = ConfigDict()
    c.export.hf_lora = True  # also write the seeds' critic file (adapter.hf_lora.pt with value_head_state_dict)
    c.export.peft = False  # the critic adapter as a PEFT directory, without the head (ignored on an MTP base)
    c.lock()
    return c
