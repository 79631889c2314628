"""Everything a run needs from its config: tokenizer and special ids, base model, trainable / frozen
trees, ObjectiveConfig, LayoutSpec and the tokenised training set. Used by train/loop.py, the eval
CLI, demo.py and plan.py.

Workdir layout written / reused here (a restarted run must see identical data and tokens):
  <workdir>/tokenizer/   the tokenizer incl. <bot> <eot> <latent> (saved once, reloaded on resume)
  <workdir>/data/        synthetic splits train.jsonl / test.jsonl / meta.json (config.data.source ==
                         "synthetic"; generated once, then reused; a config asking for different data
                         raises instead of silently mixing)
(the loop adds config.json, metrics.jsonl, tb/ and checkpoints/.) A gs:// workdir keeps these in a
local cache (~/.cache/kava_jax) and uploads a copy; they are deterministic, so every host rebuilds them.

Base model, by `config.model`:
  init_from  the workdir of an earlier run (e.g. the `cot` backbone): its resolved config.json is
             rebuilt recursively (same base, same seed) and its latest checkpoint's trained weights are
             merged in: full-mode params as they are, or base + LoRA folded (W + α/r·A·B); its special
             rows (<bot>, <eot>, <latent>) are written into the embedding; a trained `prj` is kept when
             this run uses one. Its tokenizer must map every token to the same id as this run's.
  hf_path    a local HF directory (hf_io.load_pretrained); the vocabulary grows (hf_io.resize_vocab)
             when the tokenizer has more tokens than the embedding (e.g. LLaMA + 3 KaVa tokens).
  preset     random init of kava_jax.models.PRESETS[preset] with `model.overrides`, vocab_size = the
             tokenizer's size (or a larger override).
Then LoRA leaves (train.mode "lora": rank model.lora_rank, fresh: A uniform, B zero) are added.

Special ids: `specials.start` fills the layout's BOS slot: the tokenizer's BOS, or for tokenizers
without one (Qwen2/2.5) "<|endoftext|>" (see data/tokenizer.py `SpecialTokens`).

RNG streams (all from config.seed): fold_in(key(seed), 0) base init, 1 LoRA init, 2 vocab growth,
3 prj / trainable init, 4 the train state's RNG.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import traverse_util

from kava_jax.data.pipeline import ExampleSet, tokenize_examples
from kava_jax.data.records import Record, RecordStats
from kava_jax.data.tokenizer import SpecialTokens, TokenizerBundle, load_tokenizer, prompt_ids
from kava_jax.kava.batch import LayoutSpec
from kava_jax.kava.objective import ObjectiveConfig, init_trainable
from kava_jax.models import LoraConfig, ModelConfig, fold_lora, get_preset, init_params, merge_trees, split_lora
from kava_jax.train.validate import objective_config, validate_config

log = logging.getLogger(__name__)

__all__ = ["Run", "TrainedModel", "build_run", "build_model", "layout_spec", "load_records_for", "load_trained",
           "prepare_synthetic_data", "prepare_tokenizer", "read_run_config", "rng_stream"]

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
CHECKPOINT_DIR = "checkpoints"
_STREAMS = {"init": 0, "lora": 1, "resize": 2, "trainable": 3, "state": 4}


@dataclasses.dataclass
class Run:
    """What `build_run` returns.

    params: the full decoder params the run starts from (incl. LoRA leaves when train.mode == "lora");
    trainable / frozen: `kava.objective.init_trainable` split of them (+ prj, special_embed);
    examples: the tokenised training set (None with load_data=False), records_stats: what the loader
    kept / dropped; data_source: where the records came from.
    """

    config: ml_collections.ConfigDict
    workdir: str
    tokenizer: Any
    specials: SpecialTokens
    vocab_size: int
    model_config: ModelConfig
    params: dict
    trainable: dict
    frozen: dict
    objective: ObjectiveConfig
    layout: LayoutSpec
    examples: ExampleSet | None
    record_stats: RecordStats | None
    data_source: str | None
    state_rng: jax.Array


def rng_stream(config, name: str) -> jax.Array:
    """The run's PRNG key for `name` (init, lora, resize, trainable, state)."""
    return jax.random.fold_in(jax.random.key(int(config.seed)), _STREAMS[name])


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _cache_dir(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KAVA_CACHE", Path.home() / ".cache" / "kava_jax"))
    return root / kind / digest


def _upload(local_dir: Path, remote_dir: epath.Path) -> None:
    if jax.process_index() != 0:
        return
    remote_dir.mkdir(parents=True, exist_ok=True)
    for f in local_dir.iterdir():
        if f.is_file():
            (remote_dir / f.name).write_bytes(f.read_bytes())


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------ tokenizer
def prepare_tokenizer(config, workdir: str) -> TokenizerBundle:
    """The run's tokenizer (+ <bot>/<eot>/<latent>): reloaded from <workdir>/tokenizer when it is
    there (resume), else built ("synthetic") or loaded (local path / hub id) and saved there."""
    name = config.model.tokenizer
    local = _is_local(workdir)
    tok_dir = Path(workdir) / TOKENIZER_DIR if local else _cache_dir("tokenizer", {"name": name})
    if (tok_dir / "tokenizer_config.json").exists():
        return load_tokenizer(tok_dir)
    if jax.process_index() == 0 or not local:
        if name == "synthetic":
            from kava_jax.data.tokenizer import build_synthetic_tokenizer

            build_synthetic_tokenizer(None, save_dir=tok_dir)
        else:
            p = Path(str(name)).expanduser()
            bundle = load_tokenizer(name, local_files_only=p.exists())
            tok_dir.mkdir(parents=True, exist_ok=True)
            bundle.tokenizer.save_pretrained(str(tok_dir))
    _barrier("kava_setup_tokenizer")
    if not local:
        _upload(tok_dir, epath.Path(workdir) / TOKENIZER_DIR)
    return load_tokenizer(tok_dir)


# ------------------------------------------------------------------------------------ data
def _synthetic_meta(config) -> dict:
    s = config.data.synthetic
    return {"seed": int(s.seed), "style": config.data.trace, "n_train": int(s.n_train), "n_test": int(s.n_test),
            "difficulty": {"min_steps": int(s.min_steps), "max_steps": int(s.max_steps),
                           "max_operand": int(s.max_operand), "max_value": int(s.max_value)}}


def prepare_synthetic_data(config, workdir: str) -> Path:
    """Local directory with the synthetic train/test JSONL splits of `config.data.synthetic`
    (trace = config.data.trace): <workdir>/data, generated once and reused.

    Raises ValueError naming config.data.synthetic when the directory holds data generated with
    other settings.
    """
    from kava_jax.data.synthetic import Difficulty, make_synthetic_splits

    want = _synthetic_meta(config)
    local = _is_local(workdir)
    data_dir = Path(workdir) / DATA_DIR if local else _cache_dir("synthetic", want)
    meta_path = data_dir / "meta.json"
    if not meta_path.exists() and (jax.process_index() == 0 or not local):
        make_synthetic_splits(data_dir, seed=want["seed"], n_train=want["n_train"], n_test=want["n_test"],
                              style=want["style"], difficulty=want["difficulty"], schema="steps")
    _barrier("kava_setup_data")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    have = {k: meta.get(k) for k in ("seed", "style", "n_train", "n_test")}
    have["difficulty"] = {k: meta.get("difficulty", {}).get(k) for k in want["difficulty"]}
    full = json.loads(json.dumps(dataclasses.asdict(Difficulty.of(want["difficulty"]))))
    if have != {k: want[k] for k in have} or meta.get("difficulty") != full:
        raise ValueError(f"config.data.synthetic: {data_dir} holds synthetic data generated with {have}, but the "
                         f"config asks for {want}; use a new workdir (a resumed run must see the same data)")
    if not local:
        _upload(data_dir, epath.Path(workdir) / DATA_DIR)
    return data_dir


def load_records_for(config, workdir: str, split: str | None = None) -> tuple[list[Record], RecordStats, str]:
    """(records, stats, source description) of the run's training data (config.data)."""
    from kava_jax.data.loaders import load_records

    d = config.data
    source = str(prepare_synthetic_data(config, workdir)) if d.source == "synthetic" else d.source
    records, stats = load_records(source, schema=d.schema, split=split or d.split, trace=d.trace,
                                  max_records=d.max_records, strict=bool(d.strict))
    return records, stats, source


def layout_spec(config, bundle: TokenizerBundle) -> LayoutSpec:
    """The batch layout of a run: buckets from config.data, M from config.kava, ids from the tokenizer."""
    sp = bundle.specials
    d = config.data
    pids = tuple(prompt_ids(bundle.tokenizer))
    if int(d.answer_len) < len(pids) + 2:
        raise ValueError(f"config.data.answer_len: {d.answer_len} cannot hold the prompt ({len(pids)} tokens) + one "
                         "answer token + EOS")
    return LayoutSpec(q_len=int(d.q_len), cot_len=int(d.cot_len), answer_len=int(d.answer_len),
                      num_latents=int(config.kava.num_latents), prompt_ids=pids, bos_id=sp.start, eos_id=sp.eos,
                      pad_id=sp.pad, bot_id=sp.bot, eot_id=sp.eot, latent_id=sp.latent, truncate=bool(d.truncate))


# ------------------------------------------------------------------------------------ model
def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config.json an earlier run wrote into its workdir."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a kava-train run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _lora_config(config) -> LoraConfig:
    m = config.model
    if config.train.mode != "lora":
        return LoraConfig(rank=0)
    return LoraConfig(rank=int(m.lora_rank), alpha=float(m.lora_alpha), dropout=float(m.lora_dropout),
                      targets=tuple(m.lora_targets))


@functools.lru_cache(maxsize=16)
def _init_fn(mc: ModelConfig, part: str):
    """Jitted init of `mc`'s params ("all") or only its LoRA leaves ("lora"; XLA drops the rest)."""
    if part == "lora":
        return jax.jit(lambda r: split_lora(init_params(mc, r))[1])
    return jax.jit(lambda r: init_params(mc, r))


def _fresh_lora(mc: ModelConfig, rng: jax.Array) -> dict:
    """LoRA leaves of `mc` as init_params draws them: A uniform, B zero."""
    return _init_fn(mc, "lora")(rng) if mc.lora.rank else {}


def _grow_vocab(params, mc: ModelConfig, vocab: int, rng) -> tuple[dict, ModelConfig]:
    if vocab <= mc.vocab_size:
        return params, mc
    from kava_jax.hf_io import resize_vocab

    log.info("growing the vocabulary %d -> %d for the added special tokens", mc.vocab_size, vocab)
    base, lora = split_lora(params)
    base, mc2 = resize_vocab(base, mc.replace(lora=LoraConfig(0)), vocab, rng)
    return merge_trees(base, lora), mc2.replace(lora=mc.lora)


def _check_same_tokens(old: TokenizerBundle, new: TokenizerBundle, where: str) -> None:
    ov, nv = old.tokenizer.get_vocab(), new.tokenizer.get_vocab()
    moved = [t for t, i in ov.items() if nv.get(t) != i]
    if moved:
        raise ValueError(f"config.model.init_from: the tokenizer of {where} maps {len(moved)} tokens differently "
                         f"from this run's (e.g. {moved[:5]}); both runs must share a tokenizer")


@dataclasses.dataclass
class TrainedModel:
    """A finished (or checkpointed) run, ready to decode: params with LoRA folded in and the trained
    special rows written into the embedding; prj as trained ({} when unused)."""

    config: ml_collections.ConfigDict
    workdir: str
    step: int
    bundle: TokenizerBundle
    model_config: ModelConfig  # lora rank 0
    params: dict
    prj: dict
    objective: ObjectiveConfig
    layout: LayoutSpec


def load_trained(workdir: str, step: int | None = None) -> TrainedModel:
    """The trained model of an earlier run (latest readable checkpoint unless `step`)."""
    from kava_jax.kava.student import with_special_rows
    from kava_jax.train.checkpoint import load_trainable

    config = read_run_config(workdir)
    bundle = prepare_tokenizer(config, workdir)
    mc, params, _ = build_model(config, bundle, workdir=workdir)
    trainable, step = load_trainable(epath.Path(workdir) / CHECKPOINT_DIR, step)
    if "params" in trainable:
        merged = trainable["params"]
        if set(traverse_util.flatten_dict(merged)) != set(traverse_util.flatten_dict(params)):
            raise ValueError(f"{workdir}: the checkpoint's params do not match the model its config.json builds")
    else:
        base, _ = split_lora(params)
        merged = fold_lora(merge_trees(base, trainable.get("lora", {})), mc)
    sp = bundle.specials
    ids = (sp.bot, sp.eot, sp.latent)
    if "special_embed" in trainable:
        merged = with_special_rows(merged, ids, trainable["special_embed"])
    base_mc = mc.replace(lora=LoraConfig(0))
    merged = jax.tree.map(lambda x: jnp.asarray(x, base_mc.weights_dtype), merged)
    obj = objective_config(config, base_mc, ids)
    return TrainedModel(config, str(workdir), int(step), bundle, base_mc, merged, dict(trainable.get("prj") or {}),
                        obj, layout_spec(config, bundle))


def build_model(config, bundle: TokenizerBundle, *, workdir: str | None = None) -> tuple[ModelConfig, dict, dict]:
    """(model_config, params, prj) a run starts from (see the module docstring for the three sources).

    params include fresh LoRA leaves when train.mode == "lora"; prj is a trained projection carried
    over from `init_from` ({} otherwise). Deterministic in (config, the files it names).
    """
    m = config.model
    lora = _lora_config(config)
    common = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    prj: dict = {}
    if m.init_from:
        prev = load_trained(m.init_from)
        _check_same_tokens(prev.bundle, bundle, m.init_from)
        mc = prev.model_config.replace(**common)
        params = jax.tree.map(lambda x: jnp.asarray(x, mc.weights_dtype), prev.params)
        prj = prev.prj
        log.info("model: %s from the run in %s (step %d)", mc.model_type, m.init_from, prev.step)
    elif m.hf_path:
        from kava_jax.hf_io import load_pretrained

        mc, params = load_pretrained(m.hf_path, dtype=jnp.dtype(m.param_dtype),
                                     config_overrides={**common, "lora": LoraConfig(0)})
        log.info("model: %s loaded from %s", mc.model_type, m.hf_path)
    else:
        overrides = dict(m.overrides.to_dict() if hasattr(m.overrides, "to_dict") else (m.overrides or {}))
        vocab = max(int(overrides.pop("vocab_size", 0) or 0), bundle.vocab_size)
        sp = bundle.specials
        kw = {"bos_token_id": sp.start, "eos_token_id": sp.eos, **overrides, **common}
        mc = get_preset(m.preset, **kw, vocab_size=vocab, lora=LoraConfig(0))
        params = _init_fn(mc, "all")(rng_stream(config, "init"))
        log.info("model: random init of preset %r (%s params)", m.preset, f"{mc.num_params():,}")
    if m.init_from or m.hf_path:
        ignored = {k: v for k, v in dict(m.overrides or {}).items() if k != "vocab_size" and getattr(mc, k) != v}
        if ignored:
            log.warning("config.model.overrides %s ignored: they apply to presets only; the model from model.%s "
                        "has %s", ignored, "init_from" if m.init_from else "hf_path",
                        {k: getattr(mc, k) for k in ignored})
    params, mc = _grow_vocab(params, mc, bundle.vocab_size, rng_stream(config, "resize"))
    mc = mc.replace(lora=lora)
    if lora.rank:
        params = merge_trees(params, _fresh_lora(mc, rng_stream(config, "lora")))
    return mc, params, prj


# ------------------------------------------------------------------------------------ run
def build_run(config, workdir: str, *, load_data: bool = True, num_devices: int | None = None) -> Run:
    """Validates `config` and builds tokenizer, model, trainable/frozen trees, objective, layout and
    (load_data=True) the tokenised training set. Prints nothing (Run.record_stats / Run.examples.summary()
    describe the data)."""
    validate_config(config, num_devices)
    workdir = str(workdir)
    if _is_local(workdir):
        Path(workdir).mkdir(parents=True, exist_ok=True)
    bundle = prepare_tokenizer(config, workdir)
    sp = bundle.specials
    layout = layout_spec(config, bundle)
    mc, params, prj = build_model(config, bundle, workdir=workdir)
    obj = objective_config(config, mc, (sp.bot, sp.eot, sp.latent))
    trainable, frozen = init_trainable(rng_stream(config, "trainable"), params, obj, mode=config.train.mode)
    if prj and trainable.get("prj"):
        same = jax.tree.map(lambda a, b: a.shape == b.shape, prj, trainable["prj"])
        if all(jax.tree.leaves(same)):
            trainable["prj"] = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), prj, trainable["prj"])
            log.info("prj: starting from the projection trained in %s", config.model.init_from)
    examples = stats = source = None
    if load_data:
        records, stats, source = load_records_for(config, workdir)
        examples = tokenize_examples(records, bundle.tokenizer, layout, strict=bool(config.data.strict),
                                     source=source)
        log.debug("data: %s\nexamples:\n%s", stats.summary(), examples.summary())
    return Run(config=config, workdir=workdir, tokenizer=bundle.tokenizer, specials=sp, vocab_size=bundle.vocab_size,
               model_config=mc, params=params, trainable=trainable, frozen=frozen, objective=obj, layout=layout,
               examples=examples, record_stats=stats, data_source=source, state_rng=rng_stream(config, "state"))
