"""LLaMA-3.2-1B-Instruct on GSM8k-AUG-NL (natural-language CoT): METHOD §5 row 2.
UNVERIFIED: only row 1 of the table is confirmed by two independent sources.

Paper GSM8k test accuracy (METHOD §6, % ; unverified row):
    full CoT 53.2 · no CoT 33.1 · CODI 49.7 · PCCoT 50.7 · KaVa 55.7

`get_config(arg)`: arg = a method (kava | cot | nocot | codi | pccot) and/or "runlocal", comma-separated
(see configs/paper.py). Weights: model.hf_path = a local copy of meta-llama/Llama-3.2-1B-Instruct
(`hf download meta-llama/Llama-3.2-1B-Instruct --local-dir DIR`, then `--config.model.hf_path=DIR`).
"""

from pathlib import Path

from kava_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"), "kava_configs_paper")

ROW = dict(
    backbone="llama3.2-1b", data="nl", lr=8e-4, weight_decay=0.1, epochs=10,
    alpha_codi=10.0, alpha_kv=1.0, kv_loss_type="mse", layerwise_std=True,
    use_prj=True, lam=0.1, verified=False,
)
# GSM8k test accuracy reported in the paper (METHOD §6), per method; None = not reported.
PAPER_ACCURACY = dict(cot=53.2, nocot=33.1, codi=49.7, pccot=50.7, kava=55.7)


def get_config(arg=None):
    return paper.build(ROW, arg)
