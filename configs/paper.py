"""Shared builder of the paper configs (METHOD §5): one row of hyper-parameters -> a run config.

The row files (`configs/<backbone>_gsm8k_aug[_nl].py`) hold only their row of the table and call
`build(ROW, arg)`. `arg` is a comma list of
  * a method: kava (default) | cot | nocot | codi | pccot. Baselines are the SAME row with only
    `kava.objective` changed (METHOD_OVERRIDES below); the objective itself ignores what it does not
    use (pccot/codi: no KV loss, codi: sequential latents, cot/nocot: no student);
  * "runlocal": the tiny preset on synthetic data, batch 8, 2 steps, float32, one CPU device: a quick
    local check of the whole pipeline for that row (the row's objective settings are kept).

Where the weights come from: `model.hf_path` stays None (then the preset gives a random init of the
right shape, e.g. for `kava-plan` or eval_shape); point it at a local HF directory with
config.json + *.safetensors, e.g.
    hf download meta-llama/Llama-3.2-1B-Instruct --local-dir ~/models/Llama-3.2-1B-Instruct
    kava-train --config=configs/llama32_1b_gsm8k_aug.py --config.model.hf_path=$HOME/models/Llama-3.2-1B-Instruct
"""

from __future__ import annotations

from pathlib import Path

from kava_jax.sweep import apply_overrides, load_module, make_overridable

_base = load_module(Path(__file__).with_name("base.py"), "kava_configs_base")

METHODS = ("kava", "cot", "nocot", "codi", "pccot")
# What a baseline changes relative to its KaVa row (nothing else may differ; tests check this).
METHOD_OVERRIDES = {m: {"kava.objective": m} for m in METHODS}

# preset (offline shapes), tokenizer hub id, the instruct checkpoint to download for model.hf_path.
BACKBONES = {
    "llama3.2-1b": dict(preset="llama3.2-1b", hub="meta-llama/Llama-3.2-1B-Instruct", remat="full"),
    "qwen2.5-0.5b": dict(preset="qwen2.5-0.5b", hub="Qwen/Qwen2.5-0.5B-Instruct", remat="full"),
    "llama3.2-3b": dict(preset="llama3.2-3b", hub="meta-llama/Llama-3.2-3B-Instruct", remat="full"),
}

# Hub names as used by public peers of the paper (CODI / PCCoT code and KaVa re-implementations);
# not named in the paper itself. Both ship "question", a "steps" list and "answer"; splits
# train (385,620) / validation (500) / test (1,319). Lengths: GSM8k questions are <= ~200 tokens
# (99.9 % < ~170), equation CoTs without their last step <= ~100, sentence CoTs <= ~250.
DATASETS = {
    "aug": dict(source="whynlp/gsm8k-aug", schema="steps", trace="equation", q_len=192, cot_len=128,
                answer_len=16, eval_max_cot_tokens=160),
    "nl": dict(source="whynlp/gsm8k-aug-nl", schema="nl", trace="nl", q_len=192, cot_len=256,
               answer_len=16, eval_max_cot_tokens=320),
}

ROW_FIELDS = ("backbone", "data", "lr", "weight_decay", "epochs", "alpha_codi", "alpha_kv", "kv_loss_type",
              "layerwise_std", "use_prj", "lam", "verified")


def _parse(arg) -> tuple[str, bool]:
    method, runlocal = "kava", False
    for flag in (s.strip() for s in str(arg or "").split(",")):
        if not flag:
            continue
        if flag == "runlocal":
            runlocal = True
        elif flag in METHODS:
            if method != "kava" and flag != method:
                raise ValueError(f"config arg {arg!r}: two methods given ({method!r} and {flag!r})")
            method = flag
        else:
            raise ValueError(f"config arg {arg!r}: unknown flag {flag!r} (known: {', '.join(METHODS)}, runlocal)")
    return method, runlocal


def build(row: dict, arg=None):
    """The run config of one paper row (`row` holds exactly ROW_FIELDS) for `arg` (see module doc)."""
    missing, extra = sorted(set(ROW_FIELDS) - set(row)), sorted(set(row) - set(ROW_FIELDS))
    if missing or extra:
        raise ValueError(f"paper row: missing fields {missing}, unknown fields {extra}")
    if row["backbone"] not in BACKBONES:
        raise ValueError(f"paper row: backbone {row['backbone']!r} not in {sorted(BACKBONES)}")
    if row["data"] not in DATASETS:
        raise ValueError(f"paper row: data {row['data']!r} not in {sorted(DATASETS)}")
    method, runlocal = _parse(arg)
    bb, ds = BACKBONES[row["backbone"]], DATASETS[row["data"]]

    c = _base.get_config()
    m = c.model
    m.preset = bb["preset"]           # offline shapes (eval_shape / kava-plan); the weights come from hf_path
    m.hf_path = None                  # local dir of bb["hub"] (config.json + safetensors); see the module doc
    m.init_from = None
    m.tokenizer = bb["hub"]           # hub id, or the same local dir as hf_path (works offline)
    m.lora_rank, m.lora_alpha, m.lora_dropout = 128, 32.0, 0.1
    m.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    m.dtype = "bfloat16"              # compute; params (LoRA masters, frozen base) stay float32
    m.param_dtype = "float32"
    m.remat = bb["remat"]             # memory-safe default at batch 128; see kava-plan before relaxing it

    d = c.data
    d.source, d.schema, d.trace = ds["source"], ds["schema"], ds["trace"]
    d.split = "train"
    d.q_len, d.cot_len, d.answer_len = ds["q_len"], ds["cot_len"], ds["answer_len"]
    d.strict, d.truncate = False, False  # over-long records are skipped and counted, never cut

    k = c.kava
    k.objective = "kava"
    k.num_latents, k.num_iterations = 24, 3
    k.latent_mode = "jacobi"
    k.use_prj = row["use_prj"]
    k.student_ce_weight = k.teacher_ce_weight = 1.0
    k.alpha_codi, k.alpha_kv = float(row["alpha_codi"]), float(row["alpha_kv"])
    k.codi_loss_type = "smooth_l1"
    k.kv_loss_type = row["kv_loss_type"]
    k.layerwise_std = row["layerwise_std"]
    k.kv_reduction = "mean"
    k.compression = "rkv"             # S = λ·I + (1-λ)·R; λ = 0 is cosine-only, λ = 1 attention-only
    k.lam = float(row["lam"])
    k.pre_rope = False

    t = c.train
    t.mode = "lora"
    t.batch_size = 128
    t.num_epochs = int(row["epochs"])
    t.num_steps = None
    t.lr = float(row["lr"])
    t.weight_decay = float(row["weight_decay"])
    t.schedule = "cosine"
    t.warmup_frac = 0.03
    t.grad_clip = 2.0
    t.b1, t.b2, t.eps = 0.9, 0.999, 1e-8

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip (batch 128 needs <= 128 chips)

    e = c.eval
    e.datasets = ("gsm8k", "gsm_hard", "svamp", "multiarith")
    e.max_cot_tokens = ds["eval_max_cot_tokens"]
    e.max_answer_tokens = 16

    c = apply_overrides(c, METHOD_OVERRIDES[method])
    if runlocal:
        c = apply_overrides(c, runlocal_overrides(row))
    return make_overridable(c)


def runlocal_overrides(row: dict) -> dict:
    """What "runlocal" changes: a tiny random model on offline synthetic data, 2 steps on CPU."""
    return {
        "model.preset": "tiny",
        "model.hf_path": None,
        "model.tokenizer": "synthetic",
        "model.overrides": {"vocab_size": 128},
        "model.lora_rank": 8,
        "model.dtype": "float32",
        "model.remat": "none",
        "data.source": "synthetic",
        "data.schema": "auto",
        "data.trace": DATASETS[row["data"]]["trace"],
        "data.q_len": 64,
        "data.cot_len": 64,
        "data.answer_len": 16,
        "data.synthetic.n_train": 64,
        "data.synthetic.n_test": 16,
        "train.batch_size": 8,
        "train.num_steps": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "mesh.data": -1,
        "mesh.fsdp": 1,
        "eval.datasets": ("synthetic",),
        "eval.batch_size": 8,
        "eval.limit": 16,
        "eval.max_cot_tokens": 64,
    }
