"""kava-jax: KaVa latent reasoning via compressed KV-cache distillation, in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "transformers>=5.23,<6",
    "datasets>=5.2,<6",
    "ml-collections>=1.1,<2",
    "chex>=0.1.92,<0.2",
    "safetensors>=0.8,<0.9",
    "numpy>=1.26",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "torch==2.13.0",
        "nbmake>=1.5",
        "ipykernel>=6.29",
        "ruff>=0.6",
        # libtpu lets the CPU compile for TPU topologies (the AOT plan tests).
        "jax[tpu]>=0.10.2,<0.11",
    ],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
}

setup(
    name="kava-jax",
    version="0.1.0",
    description="KaVa (arXiv 2510.02312) in JAX/Flax: latent reasoning via compressed KV-cache distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kava_jax", "kava_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "kava-train=kava_jax.train.loop:run",
            "kava-eval=kava_jax.eval.run:run",
            "kava-demo=kava_jax.demo:run",
            "kava-plan=kava_jax.train.plan:run",
        ]
    },
)
