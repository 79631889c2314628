# Environment of a kava-jax job on a TPU VM host. Sourced (not executed) by the job script that
# `launch/tpu_vm.sh run` starts on every worker, right before kava-train / kava-eval.
#
# Every value can be overridden: export it before sourcing, or write `export NAME=value` lines into
# ~/.kava_env on the workers (read first, so its values win over the defaults below; e.g. HF_TOKEN
# for the gated LLaMA repositories, KAVA_LIBTPU_PRESET).
# Safe under `set -u`; never exits the calling shell.

if [ -f "$HOME/.kava_env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.kava_env"
fi

# The virtualenv that `launch/tpu_vm.sh setup` created (kava-train, kava-eval live in its bin/).
export KAVA_VENV="${KAVA_VENV:-$HOME/kava-venv}"
if [ -d "$KAVA_VENV/bin" ]; then
  export PATH="$KAVA_VENV/bin:$PATH"
fi

# Persistent XLA compilation cache: a resumed run (preemption, `run` again) skips most of the compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/kava-jax/xla}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-5}"

# Quieter logs; tokenizers must not fork threads next to the data loader.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"

# libtpu / XLA flags. Empty by default on purpose: a flag that the installed libtpu no longer knows
# aborts the job at start-up, and these names change between releases. Opt in with
# KAVA_LIBTPU_PRESET=overlap (async collective fusion: overlaps the FSDP all-gathers and
# reduce-scatters with compute, the usual win on v4 / v5e / v5p) after checking them against your
# libtpu, or set LIBTPU_INIT_ARGS yourself.
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-}"
case "${KAVA_LIBTPU_PRESET:-none}" in
  none) ;;
  overlap)
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_enable_data_parallel_all_reduce_opt=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_data_parallel_opt_different_sized_ops=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_enable_async_collective_fusion=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_tpu_overlap_compute_collective_tc=true"
    LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS --xla_enable_async_all_gather=true"
    export LIBTPU_INIT_ARGS
    ;;
  *)
    echo "launch/env.sh: unknown KAVA_LIBTPU_PRESET='${KAVA_LIBTPU_PRESET}' (known: none, overlap)" >&2
    return 2 2>/dev/null || true
    ;;
esac
