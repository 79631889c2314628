#!/usr/bin/env python3
"""Expand a sweep file into runs with distinct workdirs and run them locally or on TPU slices.

    python launch/sweep.py --sweep configs/sweeps/eviction.py --workdir_root DIR
        [--local | --tpu NAMES] [--dry-run] [--arg CONFIG_ARG] [--sweep_arg SWEEP_ARG]
        [--config PATH] [--only 0,3] [--keep-going] [-- extra kava-train flags for every run]

A sweep file defines `CONFIG` (the base config file, relative to the repo root) and
`get_sweep(arg=None)` -> list of override dicts (see kava_jax/sweep.py). Run i becomes

    kava-train --config=CONFIG[:ARG] --workdir=ROOT/<sweep>[-<arg>]/<run_name> --config.<key>=<value> ...

Every run is checked against the config before anything starts (unknown keys, wrong types).
--local (default) runs them one after another here (a run that fails stops the sweep unless
--keep-going). --tpu launches each run with `launch/tpu_vm.sh run` on its own slice: NAMES is a comma
list with one slice per run, or a template with {i} (run index) or {run} (run name); launch waves with
--only. Zone/project for tpu_vm.sh come from KAVA_TPU_ZONE / KAVA_TPU_PROJECT or --tpu_flag.
--dry-run prints exactly the commands, one per line, and runs nothing. Rerunning a sweep resumes every
run from its workdir's last checkpoint (kava-train resumes by itself).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launch/sweep.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from kava_jax.sweep import apply_overrides, expand, load_module, run_name, to_cli_flags  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/eviction.py")
    p.add_argument("--workdir_root", required=True, help="root of the run workdirs (local dir or gs://...)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run here, one after another (default)")
    where.add_argument("--tpu", metavar="NAMES", help="TPU slices: a,b,c (one per run) or a template with {i}/{run}")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    p.add_argument("--arg", default=None, help="config arg, passed as --config=CONFIG:ARG (e.g. pccot, runlocal)")
    p.add_argument("--sweep_arg", default=None, help="argument of the sweep's get_sweep(arg)")
    p.add_argument("--config", default=None, help="base config file (default: the sweep's CONFIG)")
    p.add_argument("--only", default=None, help="comma list of run indices to launch (e.g. 0,2)")
    p.add_argument("--keep-going", "--keep_going", dest="keep_going", action="store_true",
                   help="--local: continue after a failed run")
    p.add_argument("--trainer", default="kava-train", help="trainer command (local runs)")
    p.add_argument("--tpu_flag", action="append", default=[],
                   help="extra option for launch/tpu_vm.sh run (repeatable), e.g. --tpu_flag=--zone=us-west4-a")
    p.add_argument("--manifest", default=None, help="write the runs (name, overrides, workdir, command) as JSON")
    p.add_argument("extra", nargs="*", help="after '--': extra kava-train flags for every run")
    return p.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def plan(args: argparse.Namespace) -> list[dict]:
    """The runs of the sweep: [{index, name, overrides, workdir, argv}] (argv without the trainer)."""
    sweep_path = Path(args.sweep)
    if not sweep_path.is_absolute() and not sweep_path.is_file():
        sweep_path = REPO / sweep_path
    mod = load_module(sweep_path)
    if not hasattr(mod, "get_sweep"):
        raise SystemExit(f"sweep.py: {args.sweep} defines no get_sweep(arg=None)")
    config_file = args.config or getattr(mod, "CONFIG", None)
    if not config_file:
        raise SystemExit(f"sweep.py: {args.sweep} defines no CONFIG; pass --config")
    config_path = Path(config_file) if Path(config_file).is_absolute() else REPO / config_file
    base = load_module(config_path).get_config(args.arg)
    runs = expand(mod.get_sweep(args.sweep_arg))

    group = Path(args.sweep).stem + (f"-{_slug(args.arg)}" if args.arg else "")
    config_flag = f"--config={config_file}" + (f":{args.arg}" if args.arg else "")
    out = []
    for i, ov in enumerate(runs):
        apply_overrides(base, ov)  # unknown keys / wrong types fail here, before anything runs
        name = run_name(ov)
        workdir = _join(args.workdir_root, group, name)
        argv = [config_flag, f"--workdir={workdir}", *to_cli_flags(ov, base), *args.extra]
        out.append(dict(index=i, name=name, overrides=ov, workdir=workdir, argv=argv))
    if args.only:
        try:
            keep = {int(s) for s in args.only.split(",") if s.strip()}
        except ValueError:
            raise SystemExit(f"sweep.py: --only {args.only!r} is not a comma list of run indices") from None
        bad = sorted(keep - set(range(len(out))))
        if bad:
            raise SystemExit(f"sweep.py: --only {bad} out of range (the sweep has {len(out)} runs)")
        out = [r for r in out if r["index"] in keep]
    return out


def tpu_names(spec: str, runs: list[dict]) -> list[str]:
    if "{i}" in spec or "{run}" in spec:
        return [spec.replace("{i}", str(r["index"])).replace("{run}", _slug(r["name"]).replace(".", "-").lower())
                for r in runs]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if len(names) < len(runs):
        raise SystemExit(
            f"sweep.py: {len(runs)} runs but --tpu names {len(names)} slice(s); one job per slice at a time: name "
            "one slice per run (a comma list, or a template with {i}), or launch in waves with --only")
    return names[: len(runs)]


def commands(args: argparse.Namespace, runs: list[dict]) -> list[list[str]]:
    if args.tpu:
        script = "launch/tpu_vm.sh"  # commands run (and print) relative to the repo root
        for r in runs:
            if not r["workdir"].startswith("gs://"):
                raise SystemExit(f"sweep.py: --tpu needs a gs:// --workdir_root (every host writes the workdir), "
                                 f"got {args.workdir_root!r}")
        return [["bash", script, "run", f"--name={name}", *args.tpu_flag, "--", *r["argv"]]
                for name, r in zip(tpu_names(args.tpu, runs), runs, strict=True)]
    return [[args.trainer, *r["argv"]] for r in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    cmds = commands(args, runs)
    print(f"# {args.sweep}: {len(runs)} run(s) -> {args.workdir_root}", flush=True)
    if args.manifest:
        Path(args.manifest).write_text(json.dumps(
            [dict(r, command=shlex.join(c)) for r, c in zip(runs, cmds, strict=True)], indent=2, default=repr))
    if args.dry_run:
        for c in cmds:
            print(shlex.join(c))
        return 0

    if not args.tpu and shutil.which(args.trainer) is None:
        raise SystemExit(f"sweep.py: {args.trainer!r} not found on PATH (pip install -e . in this environment)")
    failed, attempted = [], 0
    for r, c in zip(runs, cmds, strict=True):
        attempted += 1
        print(f"# run {r['index']} ({r['name']})\n{shlex.join(c)}", flush=True)
        rc = subprocess.call(c, cwd=REPO)
        if rc != 0:
            failed.append((r["index"], r["name"], rc))
            print(f"# run {r['index']} ({r['name']}) failed with exit code {rc}", file=sys.stderr, flush=True)
            if not args.keep_going:
                break
    print(f"# {attempted - len(failed)} of {len(runs)} run(s) succeeded" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
