"""LLaMA-3.2-3B-Instruct on GSM8k-AUG-NL (natural-language CoT): METHOD §5 row 6.
UNVERIFIED: only row 1 of the table is confirmed by two independent sources.

Paper GSM8k test accuracy (METHOD §6, % ; unverified row):
    full CoT 68.4 · no CoT n/a · CODI 55.9 · PCCoT 47.6 · KaVa 60.0
(no-CoT is reported for LLaMA-3.2-1B only.)
λ = 0 here: the eviction score is the redundancy (cosine) term alone; prj is off (identity).

`get_config(arg)`: arg = a method (kava | cot | nocot | codi | pccot) and/or "runlocal", comma-separated
(see configs/paper.py). Weights: model.hf_path = a local copy of meta-llama/Llama-3.2-3B-Instruct
(`hf download meta-llama/Llama-3.2-3B-Instruct --local-dir DIR`, then `--config.model.hf_path=DIR`).
"""

from pathlib import Path

from kava_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"), "kava_configs_paper")

ROW = dict(
    backbone="llama3.2-3b", data="nl", lr=2e-4, weight_decay=0.1, epochs=5,
    alpha_codi=20.0, alpha_kv=2.0, kv_loss_type="smooth_l1", layerwise_std=False,
    use_prj=False, lam=0.0, verified=False,
)
# GSM8k test accuracy reported in the paper (METHOD §6), per method; None = not reported.
PAPER_ACCURACY = dict(cot=68.4, nocot=None, codi=55.9, pccot=47.6, kava=60.0)


def get_config(arg=None):
    return paper.build(ROW, arg)
