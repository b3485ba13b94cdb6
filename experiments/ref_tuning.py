"""ref_tuning: fine-tune a reference model's LoRA adapter with the NTP loss (docs/losses.md).

The defaults are the embedded demo: a tiny random Llama and the bundled HumanEval-derived
code data, on the CPU, in about two minutes. For the seeds' production run, point
`base.path` at Sheared-LLaMA-2.7B, `data.train_path` / `data.val_path` at CodeContests JSONL,
and use `lora.rank=64, lora.alpha=128, lora.dropout=0.05`:

    python -m wmtp_fn --config experiments/ref_tuning.py --config.train.steps=300
"""

from ml_collections import ConfigDict

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.pipeline = "ref_tuning"  # which pipeline runs this config (wmtp_fn/pipelines/)
    c.seed = 42  # the one seed: data split and sampling, adapter init, dropout
    c.out_dir = "runs/ref_tuning"  # the run directory; rerunning with the same one resumes
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
    c.data.n_samples = 0  # training records drawn by difficulty sampling; 0 = every correct one
    c.data.val_n_samples = 500  # validation records (0 = all)
    c.data.correct_ratio = 1.0  # share of correct records in each difficulty bin
    c.data.difficulty_bins = ConfigDict({"all": [1, 25]})  # name -> inclusive [lo, hi] difficulty
    c.data.difficulty_weights = ConfigDict({"all": 1.0})  # name -> share of n_samples

    c.lora = ConfigDict()
    c.lora.rank = 16  # r: A is [r, in], B is [out, r]
    c.lora.alpha = 32.0  # scale alpha / r (alpha / sqrt(r) with rsLoRA)
    c.lora.dropout = 0.05  # on the LoRA input only
    c.lora.targets = ALL_TARGETS  # the linears that get an adapter, in every layer
    c.lora.use_rslora = False  # rank-stabilised scaling alpha / sqrt(r)
    c.lora.use_dora = False  # DoRA: a learned magnitude per output row

    c.optim = ConfigDict()
    c.optim.lr = 5e-3  # AdamW peak learning rate
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
    c.train.batch_size = 8  # records per optimizer step
    c.train.micro_batch_size = 8  # batch_size / micro_batch_size micro-batches are accumulated
    c.train.ce_chunk_size = 1024  # tokens per chunk of the fused linear cross-entropy
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
    c.export.hf_lora = True  # also write the seeds' hf_lora .pt next to the adapter
    c.export.peft = False  # also write a PEFT adapter directory
    c.lock()
    return c
