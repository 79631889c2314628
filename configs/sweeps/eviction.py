"""Teacher-KV eviction ablation (METHOD §3): R-KV score S = λ·I + (1-λ)·R with λ ∈ {0, 0.1, 0.5, 1},
plus `crop` (the first M CoT tokens). λ = 0 is cosine-only (redundancy), λ = 1 attention-only
(importance), λ = 0.1 the paper's default. The paper ranks R-KV > cosine-only > attention-only > crop.

5 runs on LLaMA-3.2-1B / GSM8k-AUG. `arg`: "lams=0:0.1:1" replaces the λ list (':'-separated).
"""

from kava_jax.sweep import axis, chain, parse_arg, product

CONFIG = "configs/llama32_1b_gsm8k_aug.py"


def get_sweep(arg=None):
    a = parse_arg(arg, lams="0:0.1:0.5:1")
    lams = [float(x) for x in a.lams.split(":") if x]
    return chain(
        product([{"kava.compression": "rkv"}], axis("kava.lam", lams)),
        [{"kava.compression": "crop"}],
    )
