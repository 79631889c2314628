"""Record loaders (every schema, JSON / JSONL / Parquet, malformed records) and evaluation sets,
including the real offline GSM8k / GSM-Hard / SVAMP / MultiArith files of ../shared/data."""

import json
import re
from pathlib import Path

import pytest

from kava_jax.data.evalsets import EVAL_SETS, EvalItem, load_eval_set
from kava_jax.data.loaders import load_records, parse_row
from kava_jax.data.records import DataError, Record, RecordStats, parse_answer_number
from kava_jax.data.synthetic import make_synthetic_splits

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason=f"shared offline data not found at {SHARED}"
)

GSM_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
Q1 = "How many clips did Natalia sell?"
EXPECT_EQ = Record(Q1, ["<<48/2=24>>", "<<48+24=72>>"], "72")
EXPECT_NL = Record(
    Q1, ["Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether in April and May."], "72"
)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# ------------------------------------------------------------------------------------- schemas


def test_steps_schema_jsonl_and_answer_forms(tmp_path):
    rows = [
        {"question": " Q one? ", "steps": ["<<1+2=3>>", " <<3*2=6>> "], "answer": "6"},
        {"question": "Q two?", "steps": ["<<5-1=4>>"], "answer": "#### 1,004"},
        {"question": "Q three?", "steps": ["<<1/2=0.5>>"], "answer": "$0.50"},
    ]
    recs, stats = load_records(_jsonl(tmp_path / "a.jsonl", rows), schema="steps")
    assert recs == [
        Record("Q one?", ["<<1+2=3>>", "<<3*2=6>>"], "6"),
        Record("Q two?", ["<<5-1=4>>"], "1004"),
        Record("Q three?", ["<<1/2=0.5>>"], "0.5"),
    ]
    assert (stats.seen, stats.kept, stats.num_dropped) == (3, 3, 0)
    assert "kept 3 of 3" in stats.summary()


def test_cot_schema_json_array(tmp_path):
    rows = [{"question": Q1, "cot": "<<48/2=24>> <<48+24=72>>", "answer": "#### 72"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(rows))
    assert load_records(path, schema="cot")[0] == [EXPECT_EQ]
    assert load_records(path)[0] == [EXPECT_EQ]  # auto: a cot with "<<" is the equation schema


def test_nl_schema_parquet_split_on_period(tmp_path):
    rows = [
        {"question": Q1, "cot": EXPECT_NL.steps[0] + " " + EXPECT_NL.steps[1], "answer": "72"},
        {"question": "Q?", "cot": "He pays 0.5 dollars. So it is 2! Done", "answer": 2},  # only ". " splits
    ]
    path = _parquet(tmp_path / "n.parquet", [{**r, "answer": str(r["answer"])} for r in rows])
    recs, _ = load_records(path, schema="nl")
    assert recs == [EXPECT_NL, Record("Q?", ["He pays 0.5 dollars.", "So it is 2! Done."], "2")]
    assert load_records(path)[0] == recs  # auto: a cot without "<<" is the NL schema


def test_gsm8k_schema_both_traces_and_directory_shards(tmp_path):
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    _parquet(d / "data" / "test-00000-of-00001.parquet", [{"question": Q1, "answer": GSM_SOLUTION}])
    assert load_records(d, split="test", schema="gsm8k")[0] == [EXPECT_EQ]
    assert load_records(d, split="test", schema="gsm8k", trace="nl")[0] == [EXPECT_NL]
    assert load_records(d, split="test", trace="nl")[0] == [EXPECT_NL]  # auto detects "####"
    with pytest.raises(DataError, match="no 'train' data file"):
        load_records(d)


def test_malformed_records_counted_and_strict(tmp_path):
    good = {"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "2"}
    rows = [
        good,
        {"steps": ["<<1+1=2>>"], "answer": "2"},  # 1 missing question
        {"question": "   ", "steps": ["<<1+1=2>>"], "answer": "2"},  # 2 empty question
        {"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "two"},  # 3 non-numeric
        {"question": "Q?", "steps": [], "answer": "2"},  # 4 empty CoT
        {"question": "Q?", "steps": "<<1+1=2>>", "answer": "2"},  # 5 steps not a list
        "{not json",  # 6
        {"question": "Q?", "answer": "2"},  # 7 no CoT field at all
        [1, 2],  # 8 not an object
        good,
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    recs, stats = load_records(path)
    assert recs == [Record("Q?", ["<<1+1=2>>"], "2")] * 2
    assert (stats.seen, stats.kept) == (10, 2)
    assert dict(stats.dropped) == {
        "missing_field": 2, "empty_question": 1, "non_numeric_answer": 1, "empty_cot": 1,
        "bad_type": 2, "invalid_json": 1,
    }  # fmt: skip
    assert stats.examples["missing_field"] == [1, 7]
    s = stats.summary()
    assert "kept 2 of 10" in s and "dropped 8" in s and "missing_field 2 [e.g. #1, #7]" in s
    with pytest.raises(DataError, match=r"record 1: missing_field: field 'question'"):
        load_records(path, strict=True)
    rows_ok_until_3 = [good, good, good, rows[3]]
    with pytest.raises(DataError, match=r"record 3: non_numeric_answer"):
        load_records(_jsonl(tmp_path / "b.jsonl", rows_ok_until_3), strict=True)
    with pytest.raises(DataError, match="empty_cot"):
        parse_row({"question": "Q", "cot": "no annotations here", "answer": "1"}, schema="cot")


def test_max_records_and_bad_sources(tmp_path):
    rows = [{"question": f"Q{i}?", "steps": ["<<1+1=2>>"], "answer": str(i)} for i in range(5)]
    rows.insert(1, {"question": "", "steps": ["s"], "answer": "1"})
    recs, stats = load_records(_jsonl(tmp_path / "m.jsonl", rows), max_records=3)
    assert [r.answer for r in recs] == ["0", "1", "2"] and stats.dropped["empty_question"] == 1
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="Hugging Face Hub"):
        load_records("no-such-org/no-such-dataset-kava")  # HF_DATASETS_OFFLINE=1 in conftest
    with pytest.raises(ValueError, match="schema"):
        load_records(tmp_path / "m.jsonl", schema="xml")


def test_record_stats_merge_and_answer_parsing():
    a, b = RecordStats("a"), RecordStats("b")
    a.seen, a.kept, b.seen = 3, 2, 2
    a.drop("too_long", 1)
    b.drop("too_long", 0)
    b.drop("empty_cot", 1)
    m = a.merge(b)
    assert (m.seen, m.kept, m.num_dropped, m.dropped["too_long"]) == (5, 2, 3, 2)
    table = {"18": 18.0, "#### 1,000": 1000.0, "-3": -3.0, "$5": 5.0, "3.50": 3.5, "18.": 18.0, 7: 7.0,
             "5 apples": None, "": None, "1/2": None, True: None, None: None, "nan": None}  # fmt: skip
    for text, want in table.items():
        assert parse_answer_number(text) == want, text


# ----------------------------------------------------------------------------- real GSM8k data


@needs_shared
def test_real_gsm8k_train_both_traces():
    path = SHARED / "gsm8k" / "train.jsonl"
    raw = [json.loads(x) for x in path.read_text().splitlines()]
    eq, st_eq = load_records(path, schema="gsm8k", trace="equation")
    nl, st_nl = load_records(path, schema="gsm8k", trace="nl", max_records=200)
    no_ann = [i for i, r in enumerate(raw) if "<<" not in r["answer"]]
    assert st_eq.seen == len(raw) == 7473
    assert st_eq.dropped == {"empty_cot": len(no_ann)} and st_eq.kept == len(raw) - len(no_ann)
    kept_raw = [r for i, r in enumerate(raw) if i not in set(no_ann)]
    for r, rec in zip(kept_raw[:200], eq[:200], strict=True):
        assert rec.question == r["question"].strip()
        assert rec.steps == re.findall(r"<<.*?>>", r["answer"])
        assert float(rec.answer) == float(r["answer"].split("####")[-1].replace(",", ""))
    assert len(nl) == 200 and st_nl.kept == 200
    for r, rec in zip(raw[:200], nl, strict=True):
        lines = [ln for ln in r["answer"].split("\n") if ln.strip() and not ln.startswith("####")]
        assert len(rec.steps) == len(lines)
        assert not any("<<" in s or ">>" in s or "####" in s for s in rec.steps)
        assert float(rec.answer) == float(r["answer"].split("####")[-1].replace(",", ""))


# ------------------------------------------------------------------------------------ eval sets


@needs_shared
@pytest.mark.parametrize(
    "name,count,fname", [("gsm8k", 1319, "gsm8k/test.jsonl"), ("gsm_hard", 1319, "ood/gsmhardv2.jsonl"),
                         ("svamp", 1000, "ood/svamp.jsonl"), ("multiarith", 600, "ood/mawpsmultiarith.jsonl")]
)  # fmt: skip
def test_shared_eval_sets(name, count, fname):
    items = load_eval_set(name)
    raw = [json.loads(x) for x in (SHARED / fname).read_text().splitlines() if x.strip()]
    assert len(items) == len(raw) == count
    for it, r in zip(items[:50], raw[:50], strict=True):
        assert isinstance(it, EvalItem)
        if name == "gsm8k":
            assert it.question == " ".join(r["question"].split())
            assert it.answer == float(r["answer"].split("####")[-1].strip().replace(",", ""))
        else:
            assert it.question == " ".join(r["input"].split())
            assert it.answer == float(r["target"])
    assert len(load_eval_set(name, limit=7)) == 7


def test_hub_field_names(tmp_path):
    svamp = _jsonl(tmp_path / "svamp.jsonl", [
        {"ID": "a", "Body": "Dan had 3 apples", "Question": "How many now?", "Answer": 3.0},
        {"Body": "He had 4 pears.", "Question": " How many? ", "Answer": "4"},
    ])  # fmt: skip
    assert load_eval_set("svamp", svamp) == [
        EvalItem("Dan had 3 apples. How many now?", 3.0), EvalItem("He had 4 pears. How many?", 4.0)
    ]
    hard = _jsonl(tmp_path / "hard.jsonl", [{"instruction": "Big sum?", "response": "The result is 1,234,567."}])
    assert load_eval_set("gsm_hard", hard) == [EvalItem("Big sum?", 1234567.0)]
    multi = _jsonl(tmp_path / "multi.jsonl", [{"question": "2+3?", "final_ans": "5"}, {"sQuestion": "x?",
                                                                                    "lSolutions": [8.0]}])
    assert load_eval_set("multiarith", multi) == [EvalItem("2+3?", 5.0), EvalItem("x?", 8.0)]
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": Q1, "answer": GSM_SOLUTION}])
    assert load_eval_set("gsm8k", gsm) == [EvalItem(Q1, 72.0)]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"input": "a?", "target": 1}, {"input": "b?", "target": "many"}])
    with pytest.raises(DataError, match=r"item 1: answer field 'target'"):
        load_eval_set("svamp", bad)
    with pytest.raises(DataError, match="item 0: no answer field"):
        load_eval_set("svamp", _jsonl(tmp_path / "bad2.jsonl", [{"input": "a?", "Answr": 1}]))


def test_synthetic_eval_set_and_registry(tmp_path, monkeypatch):
    paths = make_synthetic_splits(tmp_path / "syn", seed=2, n_train=10, n_test=12, schema="cot", style="nl")
    items = load_eval_set("synthetic", paths["test"])
    raw = [json.loads(x) for x in paths["test"].read_text().splitlines()]
    assert items == [EvalItem(r["question"], float(r["answer"])) for r in raw]
    assert load_eval_set("synthetic", tmp_path / "syn", limit=5) == items[:5]  # a directory -> test split
    assert set(EVAL_SETS) == {"gsm8k", "gsm_hard", "svamp", "multiarith", "synthetic"}
    with pytest.raises(ValueError, match="unknown eval set"):
        load_eval_set("mmlu")
    with pytest.raises(DataError, match="no default source"):
        load_eval_set("synthetic")
    # Default sources follow KAVA_DATA_DIR; without a local copy the Hub copy is tried (offline: error).
    (tmp_path / "dd" / "ood").mkdir(parents=True)
    _jsonl(tmp_path / "dd" / "ood" / "svamp.jsonl", [{"input": "q?", "target": 2.0}])
    monkeypatch.setenv("KAVA_DATA_DIR", str(tmp_path / "dd"))
    assert load_eval_set("svamp") == [EvalItem("q?", 2.0)]
    with pytest.raises(DataError, match="openai/gsm8k"):
        load_eval_set("gsm8k")
