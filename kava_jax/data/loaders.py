"""Training-set loaders: local JSON / JSONL / Parquet files or directories, or Hub datasets, in the
record schemas of METHOD §8, all turned into `Record(question, steps, answer)`.

Schemas (`schema=`):
  "steps"  GSM8k-AUG:        {"question", "steps": ["<<16-3-4=9>>", "<<9*2=18>>"], "answer": "18"}
  "cot"    its string copy:  {"question", "cot": "<<16-3-4=9>> <<9*2=18>>", "answer": "18" | "#### 18"}
           (steps = the "<<...>>" annotations of cot, in order)
  "nl"     GSM8k-AUG-NL:     {"question", "cot": "Sentence one. Sentence two.", "answer"}
           (steps = cot split on ". "; every step is stripped and ends with ".", "!" or "?" -- a
           "." is put back where the split removed it). A "steps" list is accepted as-is.
  "gsm8k"  original GSM8k:   {"question", "answer": "solution lines with <<..>> annotations\\n#### 18"}
           trace="equation": steps = the annotations in order (the GSM8k-AUG shape);
           trace="nl": steps = the solution lines without annotations and without the "####" line
           (the GSM8k-AUG-NL shape). The answer is the number after "####".
  "auto"   per record: a "steps" list -> steps; a "cot" string -> cot if it holds "<<", else nl;
           an "answer" holding "####" -> gsm8k (with `trace`).

Answers are parsed with `parse_answer_number` and stored canonically (`format_number`: "1,000" ->
"1000", "#### 18" -> "18"). Unusable records are skipped and counted per reason in RecordStats
(missing_field, bad_type, empty_question, non_numeric_answer, empty_cot, invalid_json), or with
strict=True raise DataError naming the source, the record index (0-based, in file order) and the
reason.

Sources: an existing file (.json, .jsonl, .parquet) or directory (its `<split>.jsonl|.json|.parquet`
or `<split>-*.parquet` / `data/<split>-*.parquet` shards), read with `datasets.load_dataset("json" |
"parquet", data_files=...)`; JSON(L) that Arrow cannot type consistently (e.g. a field that is a
list in one record and a string in another) is re-read line by line with the json module so the
bad records can be counted. Anything else is a Hub dataset name passed to `datasets.load_dataset`
(with `hub_config`); offline that fails fast and is re-raised as DataError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from kava_jax.data.records import DataError, Record, RecordStats, format_number, parse_answer_number

__all__ = [
    "SCHEMAS",
    "TRACES",
    "find_split_files",
    "iter_rows",
    "load_records",
    "parse_row",
    "split_nl_cot",
]

SCHEMAS = ("auto", "steps", "cot", "nl", "gsm8k")
TRACES = ("equation", "nl")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


# ---------------------------------------------------------------------------------------- sources


def find_split_files(directory: Path, split: str) -> list[Path]:
    """The data files of `split` in a directory (first pattern that matches wins)."""
    patterns = (
        f"{split}.jsonl", f"{split}.json", f"{split}.parquet",
        f"{split}-*.parquet", f"{split}-*.jsonl", f"{split}-*.json",
        f"data/{split}-*.parquet", f"data/{split}-*.jsonl", f"data/{split}.jsonl", f"data/{split}.parquet",
        f"{split}/*.parquet", f"{split}/*.jsonl", f"{split}/*.json",
    )  # fmt: skip
    for pat in patterns:
        files = sorted(p for p in directory.glob(pat) if p.is_file())
        if files:
            return files
    return []


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or Path(s).suffix.lower() in _FORMATS


def _resolve_files(source: str, split: str) -> list[Path] | None:
    """Local data files for source, None when source is a Hub name."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = find_split_files(p, split)
        if not files:
            listing = sorted(x.name for x in p.iterdir())[:20]
            raise DataError(f"no '{split}' data file in directory {str(p)!r} (looked for {split}.jsonl|.json|"
                            f".parquet and {split}-*.parquet shards; it holds {listing})")
        return files
    if p.is_file():
        return [p]
    if _looks_like_path(source):
        raise DataError(f"data file {source!r} does not exist")
    return None


def _json_rows_plain(files: list[Path]) -> Iterator[dict | Exception]:
    """Rows of JSON-lines / JSON-array files via the json module; an unparsable line yields the
    exception in its place (counted as invalid_json)."""
    for f in files:
        text = f.read_text(encoding="utf-8")
        head = text.lstrip()[:1]
        if head == "[":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{str(f)!r} is not valid JSON: {e}") from e
            yield from rows
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield e


def _dataset_rows(ds, batch_size: int = 1024) -> Iterator[dict]:
    cols = ds.column_names
    for batch in ds.iter(batch_size=batch_size):
        for i in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][i] for c in cols}


def iter_rows(source, *, split: str = "train", hub_config: str | None = None) -> tuple[Iterator, str]:
    """(iterator over raw rows, description) for a local file/directory or a Hub dataset name.

    A row is a dict, or an Exception standing for an unparsable JSON line (counted by callers).
    """
    import datasets

    datasets.disable_progress_bars()
    source = str(source)
    files = _resolve_files(source, split)
    if files is None:
        try:
            ds = datasets.load_dataset(source, hub_config, split=split)
        except Exception as e:  # offline: ConnectionError; unknown name: DatasetNotFoundError; ...
            raise DataError(
                f"could not load dataset {source!r} (config {hub_config!r}, split {split!r}) from the Hugging "
                f"Face Hub: {type(e).__name__}: {e}. Offline, pass a local file or directory instead."
            ) from e
        return _dataset_rows(ds), f"{source}[{split}]"
    desc = ",".join(str(f) for f in files)
    fmts = {_FORMATS.get(f.suffix.lower()) for f in files}
    if None in fmts or len(fmts) != 1:
        raise DataError(f"unsupported or mixed data file types in {desc!r} (use .json, .jsonl or .parquet)")
    fmt = fmts.pop()
    try:
        ds = datasets.load_dataset(fmt, data_files={"train": [str(f) for f in files]}, split="train")
    except Exception as e:
        if fmt != "json":
            raise DataError(f"could not read parquet data {desc!r}: {type(e).__name__}: {e}") from e
        return _json_rows_plain(files), desc  # Arrow could not type it: read record by record
    return _dataset_rows(ds), desc


# ---------------------------------------------------------------------------------------- records


def split_nl_cot(cot: str) -> list[str]:
    """Split a sentence CoT on ". " (GSM8k-AUG-NL); each step stripped, ending in '.', '!' or '?'."""
    steps = []
    for piece in cot.split(". "):
        s = piece.strip()
        if s:
            steps.append(s if s[-1] in ".!?" else s + ".")
    return steps


def _gsm8k_steps(solution: str, trace: str) -> list[str]:
    body = solution.rsplit("####", 1)[0]
    if trace == "equation":
        return _ANNOTATION_RE.findall(body)
    lines = (_ANNOTATION_RE.sub("", ln).strip() for ln in body.splitlines())
    return [re.sub(r"\s{2,}", " ", ln) for ln in lines if ln]


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _text_field(row: dict, key: str) -> str:
    if row.get(key) is None:
        raise _Bad("missing_field", f"field {key!r} is missing")
    v = row[key]
    if not isinstance(v, str):
        raise _Bad("bad_type", f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _detect(row: dict) -> str:
    if row.get("steps") is not None:
        return "steps"
    if isinstance(row.get("cot"), str):
        return "cot" if "<<" in row["cot"] else "nl"
    if isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    raise _Bad("missing_field", "no CoT field: need 'steps', 'cot', or a GSM8k 'answer' with '####'")


def parse_row(row, schema: str = "auto", trace: str = "equation") -> Record:
    """One raw row -> Record; raises DataError(reason: detail) when it is unusable."""
    try:
        return _parse(row, schema, trace)
    except _Bad as b:
        raise DataError(f"{b.reason}: {b.detail}") from None


def _parse(row, schema: str, trace: str) -> Record:
    if not isinstance(row, dict):
        raise _Bad("bad_type", f"record must be a JSON object, got {type(row).__name__}")
    question = _text_field(row, "question").strip()
    if not question:
        raise _Bad("empty_question", "question is empty")
    kind = _detect(row) if schema == "auto" else schema
    if row.get("answer") is None:
        raise _Bad("missing_field", "field 'answer' is missing")
    raw_answer = row["answer"]
    if kind == "gsm8k":
        solution = _text_field(row, "answer")
        if "####" not in solution:
            raise _Bad("non_numeric_answer", "GSM8k answer has no '#### N' line")
        steps = _gsm8k_steps(solution, trace)
        raw_answer = solution.rsplit("####", 1)[1]
    elif kind == "steps" or (kind == "nl" and row.get("steps") is not None):
        st = row.get("steps")
        if st is None:
            raise _Bad("missing_field", "field 'steps' is missing")
        if not isinstance(st, (list, tuple)) or not all(isinstance(s, str) for s in st):
            raise _Bad("bad_type", f"field 'steps' must be a list of strings, got {type(st).__name__}")
        steps = [s.strip() for s in st if s.strip()]
    elif kind == "cot":
        steps = _ANNOTATION_RE.findall(_text_field(row, "cot"))
    elif kind == "nl":
        steps = split_nl_cot(_text_field(row, "cot"))
    else:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    value = parse_answer_number(raw_answer)
    if value is None:
        raise _Bad("non_numeric_answer", f"answer {str(raw_answer)[:60]!r} is not a number")
    if not steps:
        raise _Bad("empty_cot", "no CoT step could be extracted")
    return Record(question=question, steps=steps, answer=format_number(value))


def load_records(
    source,
    *,
    schema: str = "auto",
    split: str = "train",
    trace: str = "equation",
    max_records: int | None = None,
    strict: bool = False,
    hub_config: str | None = None,
) -> tuple[list[Record], RecordStats]:
    """Records of a local file/directory or a Hub dataset (see the module docstring).

    trace applies to GSM8k-format records ("equation" | "nl"). max_records stops once that many
    records were KEPT. Returns (records, stats); stats.summary() is a readable one-liner.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    rows, desc = iter_rows(source, split=split, hub_config=hub_config)
    stats = RecordStats(source=desc)
    out: list[Record] = []
    for i, row in enumerate(rows):
        if max_records is not None and len(out) >= max_records:
            break
        stats.seen += 1
        try:
            if isinstance(row, Exception):
                raise _Bad("invalid_json", str(row))
            rec = _parse(row, schema, trace)
        except _Bad as b:
            if strict:
                raise DataError(f"{desc}: record {i}: {b.reason}: {b.detail}") from None
            stats.drop(b.reason, i)
            continue
        out.append(rec)
        stats.kept += 1
    return out, stats
