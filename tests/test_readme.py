"""The README's commands and public API stay true."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_test_command() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"^TEST_COMMAND='(.*)'$", text, re.M)
    assert m, ".ci/run must define TEST_COMMAND='...'"
    return m.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert _ci_test_command() in readme.splitlines(), "README's test command differs from .ci/run"


def test_readme_main_job_command_installs_and_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0].strip()
    assert "pip install" in first_block and first_block.endswith("kava-demo")


def test_public_api_is_importable_as_documented():
    names = {
        "kava_jax.hf_io": ["load_pretrained", "save_pretrained", "resize_vocab"],
        "kava_jax.models": ["forward", "ModelConfig", "get_preset", "init_params", "split_lora", "merge_trees",
                            "fold_lora", "DecoderOutput"],
        "kava_jax.kava.compress": ["importance", "redundancy", "select", "gather", "compress_teacher_kv"],
        "kava_jax.kava.objective": ["kava_loss", "ObjectiveConfig"],
        "kava_jax.data.tokenizer": ["load_tokenizer"],
        "kava_jax.train.loop": ["train", "run"],
        "kava_jax.eval.evaluate": ["evaluate"],
        "kava_jax.eval.run": ["evaluate_workdir", "run"],
        "kava_jax.demo": ["run", "main"],
    }
    for module, attrs in names.items():
        mod = importlib.import_module(module)
        for a in attrs:
            assert hasattr(mod, a), f"{module}.{a} is documented in the README but missing"


def test_console_scripts_point_at_real_functions():
    setup = (ROOT / "setup.py").read_text()
    for name, target in re.findall(r'"(kava-[a-z]+)=([\w.:]+)"', setup):
        module, func = target.split(":")
        if name == "kava-plan" and importlib.util.find_spec(module) is None:
            raise AssertionError("kava-plan's module is missing")
        assert callable(getattr(importlib.import_module(module), func)), f"{name} -> {target} is not callable"
