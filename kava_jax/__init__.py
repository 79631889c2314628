"""kava-jax: KaVa (arXiv 2510.02312) latent reasoning via compressed KV-cache distillation, in JAX/Flax.

Subpackages: `models` (the decoder), `kava` (teacher, compression, student, losses, objective),
`data`, `train`, `eval`; modules `hf_io`, `kv`, `demo`, `sweep`. See README.md for the public API.
"""

__version__ = "0.1.0"
