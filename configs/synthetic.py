"""Tiny CPU config: the offline synthetic task (DEMO_NOTES.md), trains in minutes on a laptop CPU.

`--config=configs/synthetic.py:ARG` with ARG a comma list of
  * an objective: cot | nocot | codi | pccot | kava (default kava),
  * a trace: equation (default) | nl,
  * "quick": a much smaller model, data set and step count (tests, smoke checks; about a minute).

Model (DEMO_NOTES): Llama-style, d 128, 2 layers, 4 heads / 2 KV heads (head dim 32), MLP 344, tied
embeddings, float32, random init, vocab = the synthetic word-level tokenizer (~90 tokens).
Data: 20,000 generated training problems with 3 operations each (start 1-20, + - <= 20, x2-x5,
values <= 999); buckets Q 48 (questions are <= 44 tokens incl. BOS), C 24 equation / 40 NL (the
two steps the teacher keeps are <= 22 / 37 tokens), R 8 (" The answer is:" 4 + <= 3 digits + EOS).
Optimiser: AdamW (0.9, 0.98, wd 0.01), clip 1.0, batch 32, 50 warm-up steps, linear decay.

Objectives:
  * cot / nocot train the whole model from scratch (train.mode "full", lr 3e-3): CoT learning is a
    sharp transition at ~18-30 k examples on this task, so 1,500 steps (48 k examples); NL traces
    need ~2-3x that budget (DEMO_NOTES), so 3,000 steps with trace nl.
  * codi / pccot / kava are LoRA students (rank 16, alpha 32, dropout 0; lr 2e-3, 1,000 steps) that
    should start from the trained CoT backbone: pass `--config.model.init_from=<cot workdir>` (from
    scratch they only check the mechanics). M = 8 latents and T = 3 Jacobi iterations: M = 8 covers
    most of the ~17 CoT tokens the teacher keeps at a quarter of the paper's 24, which keeps a
    latent step (1 teacher + T + 2 student passes) cheap on CPU; the KaVa terms follow the paper's
    LLaMA-1B / AUG row (alpha_codi 10, alpha_kv 1, smooth-L1, layer-wise std, lambda 0.1).
"""

from pathlib import Path

from kava_jax.sweep import load_module, make_overridable

_base = load_module(Path(__file__).with_name("base.py"), "kava_configs_base")

OBJECTIVES = ("cot", "nocot", "codi", "pccot", "kava")
TRACES = ("equation", "nl")
STUDENTS = ("codi", "pccot", "kava")


def _parse(arg) -> tuple[str, str, bool]:
    objective, trace, quick = None, None, False
    for flag in (s.strip() for s in str(arg or "").split(",")):
        if not flag:
            continue
        if flag == "quick":
            quick = True
        elif flag in OBJECTIVES:
            if objective not in (None, flag):
                raise ValueError(f"configs/synthetic.py: two objectives in {arg!r} ({objective!r}, {flag!r})")
            objective = flag
        elif flag in TRACES:
            if trace not in (None, flag):
                raise ValueError(f"configs/synthetic.py: two traces in {arg!r} ({trace!r}, {flag!r})")
            trace = flag
        else:
            raise ValueError(f"configs/synthetic.py: unknown arg flag {flag!r} (known: {', '.join(OBJECTIVES)}, "
                             f"{', '.join(TRACES)}, quick)")
    return objective or "kava", trace or "equation", quick


def get_config(arg=None):
    objective, trace, quick = _parse(arg)
    student = objective in STUDENTS
    c = _base.get_config()
    c.seed = 0

    m = c.model
    m.preset = "tiny"
    m.hf_path = None
    m.init_from = None  # students: the workdir of the trained `cot` run
    m.tokenizer = "synthetic"
    m.overrides.hidden_size = 128
    m.overrides.num_layers = 2
    m.overrides.num_heads = 4
    m.overrides.num_kv_heads = 2
    m.overrides.head_dim = 32
    m.overrides.mlp_dim = 344
    m.overrides.tie_word_embeddings = True
    m.lora_rank, m.lora_alpha, m.lora_dropout = 16, 32.0, 0.0
    m.dtype = m.param_dtype = "float32"
    m.remat = "none"

    d = c.data
    d.source, d.schema, d.trace, d.split = "synthetic", "steps", trace, "train"
    d.q_len, d.cot_len, d.answer_len = 48, (24 if trace == "equation" else 40), 8
    d.strict, d.truncate = False, False
    s = d.synthetic
    s.n_train, s.n_test = 20000, 500
    s.min_steps = s.max_steps = 3
    s.max_operand, s.max_value, s.seed = 20, 999, 1234

    k = c.kava
    k.objective = objective
    k.num_latents, k.num_iterations = 8, 3
    k.latent_mode = "jacobi"
    k.use_prj = True
    k.alpha_codi, k.alpha_kv = 10.0, 1.0
    k.codi_loss_type = k.kv_loss_type = "smooth_l1"
    k.layerwise_std = True
    k.compression, k.lam = "rkv", 0.1

    t = c.train
    t.mode = "lora" if student else "full"
    t.batch_size = 32
    t.num_steps = 1000 if student else (1500 if trace == "equation" else 3000)
    t.lr = 2e-3 if student else 3e-3
    t.schedule = "linear"
    t.warmup_frac = 50 / t.num_steps
    t.weight_decay = 0.01
    t.b1, t.b2, t.eps = 0.9, 0.98, 1e-8
    t.grad_clip = 1.0
    t.grad_accum = 1
    t.log_every = 20
    t.checkpoint_every = 250
    t.keep_checkpoints = 2

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1

    e = c.eval
    e.batch_size = 100
    e.datasets = ("synthetic",)
    e.max_cot_tokens = 32 if trace == "equation" else 48
    e.max_answer_tokens = 6

    if quick:
        m.overrides.hidden_size, m.overrides.head_dim, m.overrides.mlp_dim = 32, 8, 64
        m.lora_rank = 4
        s.n_train, s.n_test = 256, 32
        k.num_latents, k.num_iterations = 4, 1
        t.batch_size = 8
        t.num_steps = 24
        t.lr = 1e-2
        t.warmup_frac = 0.1
        t.log_every = 2
        t.checkpoint_every = 8
        e.batch_size, e.limit = 16, 32
    return make_overridable(c)
