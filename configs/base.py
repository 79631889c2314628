"""Base run config: every section and field with its default and meaning.

Use: `kava-train --config configs/base.py --workdir DIR --config.train.lr=1e-3`. Other config files
start from `get_config()` here and override. `arg` is a comma-separated list of flags (e.g.
"runlocal") that shrink a run for a local check.
"""

import ml_collections

from kava_jax.sweep import make_overridable


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = False  # call jax.distributed.initialize() (multi-host pods)

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.preset = "tiny"        # random init from kava_jax.models.PRESETS (when hf_path / init_from unset)
    m.hf_path = None         # local HF directory (config.json + safetensors) to load the base from
    m.init_from = None       # workdir of an earlier run (e.g. the `cot` backbone) to start from
    m.tokenizer = "synthetic"  # "synthetic" (built offline into the workdir) or a local path / hub id
    m.overrides = ml_collections.ConfigDict()  # ModelConfig field overrides for a preset (e.g. hidden_size)
    m.lora_rank = 128
    m.lora_alpha = 32.0
    m.lora_dropout = 0.1
    m.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    m.dtype = "float32"      # compute dtype ("bfloat16" on TPU)
    m.param_dtype = "float32"
    m.remat = "none"         # none | full | dots | dots_no_batch

    # ---------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"   # "synthetic", a local JSON/JSONL/Parquet file or dir, or a hub dataset name
    d.schema = "auto"        # auto | steps | cot | nl | gsm8k
    d.trace = "equation"     # equation | nl (synthetic data and the gsm8k schema)
    d.split = "train"
    d.max_records = None
    d.strict = False         # malformed / over-long records raise instead of being counted and skipped
    d.truncate = False       # truncate over-long question / CoT (counted) instead of skipping the record
    d.q_len = 64             # question block incl. BOS (Q)
    d.cot_len = 64           # CoT block (C)
    d.answer_len = 16        # answer block: prompt + answer + EOS (R)
    d.synthetic = s = ml_collections.ConfigDict()
    s.n_train = 20000
    s.n_test = 500
    s.min_steps = 3
    s.max_steps = 3
    s.max_operand = 20
    s.max_value = 999
    s.seed = 1234

    # ---------------------------------------------------------------- objective (METHOD §2-4)
    c.kava = k = ml_collections.ConfigDict()
    k.objective = "kava"     # kava | pccot | codi | cot | nocot
    k.num_latents = 24       # M
    k.num_iterations = 3     # T (Jacobi passes)
    k.latent_mode = "jacobi"  # jacobi | sequential (codi always runs sequential)
    k.use_prj = True
    k.student_ce_weight = 1.0
    k.teacher_ce_weight = 1.0
    k.alpha_codi = 10.0      # α₁
    k.alpha_kv = 1.0         # α₂
    k.codi_loss_type = "smooth_l1"
    k.kv_loss_type = "smooth_l1"
    k.layerwise_std = True
    k.kv_reduction = "mean"  # mean | sum_2m
    k.compression = "rkv"    # rkv | attention | cosine | crop
    k.lam = 0.1              # λ in S = λ·I + (1-λ)·R
    k.pre_rope = False
    k.redundancy_chunk = None
    k.remat_latent_scan = False

    # ---------------------------------------------------------------- optimisation
    c.train = t = ml_collections.ConfigDict()
    t.mode = "lora"          # lora (paper) | full
    t.batch_size = 128       # global batch
    t.num_epochs = 10
    t.num_steps = None       # overrides num_epochs when set
    t.lr = 8e-4
    t.schedule = "cosine"    # cosine | linear | constant (after warm-up)
    t.warmup_frac = 0.03
    t.weight_decay = 0.1
    t.b1 = 0.9
    t.b2 = 0.999
    t.eps = 1e-8
    t.grad_clip = 2.0
    t.grad_accum = 1
    t.log_every = 10
    t.checkpoint_every = 500
    t.keep_checkpoints = 3
    t.eval_every = None      # steps between in-loop greedy evals (None: none; run kava-eval on the workdir)

    # ---------------------------------------------------------------- mesh / sharding
    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    ms.rules = ()            # extra (logical, mesh axes) rules, prepended to the defaults

    # ---------------------------------------------------------------- evaluation
    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 64
    e.max_answer_tokens = 16
    e.max_cot_tokens = 128
    e.datasets = ("synthetic",)
    e.limit = None

    if arg:
        for flag in str(arg).split(","):
            if flag == "runlocal":
                c.model.overrides = ml_collections.ConfigDict(dict(vocab_size=128))
                c.train.batch_size = 8
                c.train.num_steps = 4
                c.train.log_every = 1
                c.data.synthetic.n_train = 64
                c.data.synthetic.n_test = 16
            elif flag:
                raise ValueError(f"configs/base.py: unknown arg flag {flag!r} (known: runlocal)")
    return make_overridable(c)  # None-valued fields stay overridable from the command line
