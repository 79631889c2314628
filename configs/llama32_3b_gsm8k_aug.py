"""LLaMA-3.2-3B-Instruct on GSM8k-AUG (equation CoT): METHOD §5 row 5.
UNVERIFIED: only row 1 of the table is confirmed by two independent sources.

Paper GSM8k test accuracy (METHOD §6, % ; unverified row):
    full CoT 73.2 · no CoT n/a · CODI 61.0 · PCCoT 54.7 · KaVa 65.7
(no-CoT is reported for LLaMA-3.2-1B only.)

`get_config(arg)`: arg = a method (kava | cot | nocot | codi | pccot) and/or "runlocal", comma-separated
(see configs/paper.py). Weights: model.hf_path = a local copy of meta-llama/Llama-3.2-3B-Instruct
(`hf download meta-llama/Llama-3.2-3B-Instruct --local-dir DIR`, then `--config.model.hf_path=DIR`).
"""

from pathlib import Path

from kava_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"), "kava_configs_paper")

ROW = dict(
    backbone="llama3.2-3b", data="aug", lr=2e-4, weight_decay=0.1, epochs=5,
    alpha_codi=20.0, alpha_kv=2.0, kv_loss_type="smooth_l1", layerwise_std=False,
    use_prj=True, lam=0.1, verified=False,
)
# GSM8k test accuracy reported in the paper (METHOD §6), per method; None = not reported.
PAPER_ACCURACY = dict(cot=73.2, nocot=None, codi=61.0, pccot=54.7, kava=65.7)


def get_config(arg=None):
    return paper.build(ROW, arg)
