"""Seeds for mean ± std (METHOD §7 reports accuracy over 3 seeds).

3 runs of LLaMA-3.2-1B / GSM8k-AUG. Other rows or baselines: pass `--config` / `--arg` to
launch/sweep.py (e.g. `--arg pccot`). `arg`: "n=5" for more seeds.
"""

from kava_jax.sweep import axis, parse_arg

CONFIG = "configs/llama32_1b_gsm8k_aug.py"


def get_sweep(arg=None):
    a = parse_arg(arg, n=3)
    if a.n < 1:
        raise ValueError(f"seeds sweep: n must be >= 1, got {a.n}")
    return axis("seed", range(a.n))
