"""KV-matching loss ablation (METHOD §4): distance d ∈ {l1, smooth_l1, mse} × weight α₂ ∈ {0.5, 1, 2}.

9 runs on LLaMA-3.2-1B / GSM8k-AUG (the paper's row: smooth_l1, α₂ = 1). `arg`: "alphas=1:2" replaces
the α₂ list (':'-separated); "types=mse:l1" the loss types.
"""

from kava_jax.sweep import axis, parse_arg, product

CONFIG = "configs/llama32_1b_gsm8k_aug.py"


def get_sweep(arg=None):
    a = parse_arg(arg, types="l1:smooth_l1:mse", alphas="0.5:1:2")
    return product(
        axis("kava.kv_loss_type", [t for t in a.types.split(":") if t]),
        axis("kava.alpha_kv", [float(x) for x in a.alphas.split(":") if x]),
    )
