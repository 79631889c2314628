"""Qwen2.5-0.5B-Instruct on GSM8k-AUG (equation CoT): METHOD §5 row 3.
UNVERIFIED: only row 1 of the table is confirmed by two independent sources.

Paper GSM8k test accuracy (METHOD §6, % ; unverified row):
    full CoT 50.6 · no CoT n/a · CODI 37.5 · PCCoT 20.5 · KaVa 46.9
(no-CoT is reported for LLaMA-3.2-1B only.)

`get_config(arg)`: arg = a method (kava | cot | nocot | codi | pccot) and/or "runlocal", comma-separated
(see configs/paper.py). Weights: model.hf_path = a local copy of Qwen/Qwen2.5-0.5B-Instruct
(`hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR`, then `--config.model.hf_path=DIR`).
"""

from pathlib import Path

from kava_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"), "kava_configs_paper")

ROW = dict(
    backbone="qwen2.5-0.5b", data="aug", lr=5e-4, weight_decay=0.01, epochs=10,
    alpha_codi=10.0, alpha_kv=1.0, kv_loss_type="mse", layerwise_std=False,
    use_prj=True, lam=0.1, verified=False,
)
# GSM8k test accuracy reported in the paper (METHOD §6), per method; None = not reported.
PAPER_ACCURACY = dict(cot=50.6, nocot=None, codi=37.5, pccot=20.5, kava=46.9)


def get_config(arg=None):
    return paper.build(ROW, arg)
