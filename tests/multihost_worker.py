"""One process of the multi-host test (tests/test_multihost.py launches it; not a test itself).

    python tests/multihost_worker.py --workdir W --out RESULT.json --devices 4 [--distributed] [--steps N]

Sets XLA_FLAGS (N fake CPU devices) before JAX starts, builds configs/synthetic.py:kava,quick with a
few steps, and trains through the real `kava_jax.train.loop.train(config, workdir)`. With
--distributed, config.distributed=True and this process joins the job described by the environment
(KAVA_COORDINATOR, KAVA_NUM_PROCESSES, KAVA_PROCESS_ID: see kava_jax/train/distributed.py) before
anything touches a JAX backend, as `kava-train`'s main() does. Writes what train() returned plus
this process's place in the job to --out.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_config(steps: int, objective: str = "kava"):
    """configs/synthetic.py:<objective>,quick cut to `steps` steps, logging every step, checkpoints every 2."""
    from kava_jax.sweep import load_module

    config = load_module(ROOT / "configs" / "synthetic.py", "kava_multihost_synthetic").get_config(f"{objective},quick")
    t = config.train
    t.num_steps = steps
    t.log_every = 1
    t.checkpoint_every = 2
    t.keep_checkpoints = 2
    t.schedule = "constant"
    t.warmup_frac = 0.0
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, required=True, help="fake CPU devices in this process")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--objective", default="kava", help="configs/synthetic.py objective")
    p.add_argument("--distributed", action="store_true")
    a = p.parse_args()

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={a.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    config = build_config(a.steps, a.objective)
    config.distributed = a.distributed
    # train() itself initialises jax.distributed (config.distributed): this worker tests that path.
    import logging

    rank = int(os.environ.get("KAVA_PROCESS_ID", "0"))  # not jax.process_index(): that would start the backend
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[p{rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from kava_jax.train.loop import train

    result = train(config, a.workdir)
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "cpu_collectives": jax.config.jax_cpu_collectives_implementation, "result": result}
    Path(a.out).write_text(json.dumps(info, default=float, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
