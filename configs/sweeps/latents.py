"""Latent budget: number of latent slots M ∈ {12, 24, 36} × Jacobi iterations T ∈ {1, 3, 5}.

9 runs on LLaMA-3.2-1B / GSM8k-AUG (the paper's main setting: M = 24, T = 3). M also sets how many
teacher KV entries per layer and head are kept by the compression. `arg`: "m=12:24,t=3" replaces the
lists (':'-separated).
"""

from kava_jax.sweep import axis, parse_arg, product

CONFIG = "configs/llama32_1b_gsm8k_aug.py"


def get_sweep(arg=None):
    a = parse_arg(arg, m="12:24:36", t="1:3:5")
    return product(
        axis("kava.num_latents", [int(x) for x in a.m.split(":") if x]),
        axis("kava.num_iterations", [int(x) for x in a.t.split(":") if x]),
    )
