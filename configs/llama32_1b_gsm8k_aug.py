"""LLaMA-3.2-1B-Instruct on GSM8k-AUG (equation CoT): METHOD §5 row 1.
Verified: the one row confirmed by two independent sources.

Paper GSM8k test accuracy (METHOD §6, % ; verified row):
    full CoT 61.6 · no CoT 30.9 · CODI 55.6 · PCCoT 53.4 · KaVa 56.5

`get_config(arg)`: arg = a method (kava | cot | nocot | codi | pccot) and/or "runlocal", comma-separated
(see configs/paper.py). Weights: model.hf_path = a local copy of meta-llama/Llama-3.2-1B-Instruct
(`hf download meta-llama/Llama-3.2-1B-Instruct --local-dir DIR`, then `--config.model.hf_path=DIR`).
"""

from pathlib import Path

from kava_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"), "kava_configs_paper")

ROW = dict(
    backbone="llama3.2-1b", data="aug", lr=8e-4, weight_decay=0.1, epochs=10,
    alpha_codi=10.0, alpha_kv=1.0, kv_loss_type="smooth_l1", layerwise_std=True,
    use_prj=True, lam=0.1, verified=True,
)
# GSM8k test accuracy reported in the paper (METHOD §6), per method; None = not reported.
PAPER_ACCURACY = dict(cot=61.6, nocot=30.9, codi=55.6, pccot=53.4, kava=56.5)


def get_config(arg=None):
    return paper.build(ROW, arg)
