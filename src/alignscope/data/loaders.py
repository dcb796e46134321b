"""Reading (prompt, response) rows from the common dataset formats.

Two things are detected, each from the content rather than the file name alone:

- the *container*: a directory saved by ``datasets.save_to_disk`` (``hf``), a JSON list, JSONL,
  a CSV with a header, or plain text / a headerless CSV with one prompt per line;
- the *format*, from the column names of the records (``FORMATS``; docs/diagnose.md has the
  table). ``format=`` overrides it (``--safety-format`` / ``--data-format`` on the CLI).

Each row is ``{"prompt": str}`` plus ``"response": str`` where the format has one. The role
decides what a response means: for fine-tuning data (``role="data"``) it is the training target
and required on every row; for a safety set (``role="safety"``) it is the aligned reference
response, so a format whose response column is *not* an aligned answer (AdvBench's ``target``,
a harmful-compliance string) has it dropped there.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Row = dict[str, str]
Role = Literal["safety", "data"]


@dataclass(frozen=True)
class _Format:
    detect: tuple[tuple[str, ...], ...]  # column sets (lower case): having all of one = this
    columns: str  # what the format reads, for error messages
    row: Callable[[dict[str, Any]], tuple[Any, Any]]  # record -> (prompt, response or None)
    safety_response: bool = True  # may its response serve as the aligned reference?


def _join(first: Any, extra: Any) -> Any:
    # Alpaca's and Dolly's own prompt layouts put the input/context after the instruction.
    return f"{first}\n\n{extra}" if first and extra else first


def _chat(rec: dict[str, Any]) -> tuple[Any, Any]:
    # First user turn, then the first assistant turn after it; system turns are ignored.
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        raise ValueError("'messages' is not a list of {role, content} objects")
    user = next((i for i, m in enumerate(msgs) if _role(m) == "user"), None)
    if user is None:
        raise ValueError("a 'messages' row has no user turn")
    bot = next((m for m in msgs[user + 1 :] if _role(m) == "assistant"), None)
    return _text(msgs[user].get("content")), None if bot is None else _text(bot.get("content"))


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _harmbench(rec: dict[str, Any]) -> tuple[Any, Any]:
    # HarmBench's own layout for contextual behaviours: the context, a rule, then the request.
    context = rec.get("contextstring")
    return (f"{context}\n\n---\n\n{rec['behavior']}" if context else rec["behavior"]), None


def _text(content: Any) -> Any:
    # OpenAI-style content may be a list of parts; keep the text parts.
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


_RESPONSES = ("response", "completion", "output", "answer")  # the plain format's, first found

# Detection tries these in order: the first whose identifying columns are all present wins.
FORMATS: dict[str, _Format] = {
    "chat": _Format((("messages",),), "messages[{role, content}]", _chat),
    "advbench": _Format(
        (("goal",),), "goal, target", lambda r: (r["goal"], r.get("target")), safety_response=False
    ),
    "harmbench": _Format((("behavior",),), "Behavior[, ContextString]", _harmbench),
    "dolly": _Format(
        (("instruction", "context"), ("instruction", "category")),
        "instruction, context, response",
        lambda r: (_join(r["instruction"], r.get("context")), r.get("response")),
    ),
    "alpaca": _Format(
        (("instruction",),),
        "instruction, input, output",
        lambda r: (_join(r["instruction"], r.get("input")), r.get("output")),
    ),
    # GSM8K and most question-answering sets (before donotanswer, which has questions only).
    "qa": _Format((("question", "answer"),), "question, answer", lambda r: (r["question"],
                  r["answer"])),  # fmt: skip
    # Do-Not-Answer ships other models' answers (GPT4_response, ...): never used as responses.
    "donotanswer": _Format(
        (("question",), ("prompt", "intents"), ("prompt", "risk_area")),
        "question (or prompt + intents)",
        lambda r: (r["question"] if "question" in r else r["prompt"], None),
    ),
    "plain": _Format(
        (("prompt",),),
        "prompt[, response, completion, output or answer]",
        lambda r: (r["prompt"], next((r[k] for k in _RESPONSES if r.get(k) is not None), None)),
    ),
    "lines": _Format((), "one prompt per line", lambda r: (r["prompt"], None)),
}
CONTAINERS = ("hf",)  # a format name that only forces the container (columns still detected)


@dataclass
class LoadedRows:
    """Rows read from one file, and how they were read (recorded in results.json)."""

    rows: list[Row]
    format: str  # a key of FORMATS
    source: str  # hf | json | jsonl | csv | text
    path: str
    skipped: int = 0  # records whose prompt was empty, left out
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "source": self.source,
            "rows": len(self.rows),
            "skipped_empty": self.skipped,
            "notes": self.notes,
        }


def _override_hint() -> str:
    return "name the format with --safety-format / --data-format (format= in Python)"


def _expected() -> str:
    return "; ".join(f"{name} ({f.columns})" for name, f in FORMATS.items())


def _detect(columns: list[str], where: str) -> str:
    low = {c.lower() for c in columns}
    for name, fmt in FORMATS.items():
        if any(low.issuperset(cols) for cols in fmt.detect):
            return name
    raise ValueError(
        f"{where}: cannot tell the format from the columns {columns}; expected one of: "
        f"{_expected()}; or {_override_hint()}"
    )


def _read_json(text: str, where: str) -> tuple[list[Any], str]:
    """A JSON list, or JSONL (one value per line); errors carry the line number."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}:{err.lineno}: not valid JSON ({err.msg})") from None
        return data, "json"
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}:{i}: not valid JSON ({err.msg}); JSONL needs one object per line"
                ) from None
    return records, "jsonl"


def _looks_json(text: str) -> bool:
    # For names other than .json/.jsonl: JSON only if it parses (a prompt may start with "[").
    head = text.lstrip()
    try:
        if head.startswith("{"):
            json.loads(head.splitlines()[0])
        elif head.startswith("["):
            json.loads(head)
        else:
            return False
    except json.JSONDecodeError:
        return False
    return True


def _header_keys() -> set[str]:
    return {k for f in FORMATS.values() for cols in f.detect for k in cols} | {*_RESPONSES}


def _known_header(line: str) -> bool:
    cells = next(csv.reader([line]), [])
    return any(c.strip().lower() in _header_keys() for c in cells)


# Separators of spreadsheet exports that the comma CSV reader would take for one column.
_OTHER_DELIMITERS = {";": "semicolon", "\t": "tab"}


def _refuse_table_as_lines(lines: list[str], where: str) -> None:
    """Before reading a file as one prompt per line: refuse one that looks like a table that
    detection could not read (its header would become a prompt, its columns one string)."""
    rows = [line for line in lines if line.strip()][:100]
    first = rows[0]
    for delim, name in _OTHER_DELIMITERS.items():
        split = [next(csv.reader([row], delimiter=delim), []) for row in rows]  # quotes respected
        cells = [c.strip().lower() for c in split[0]]
        if len(cells) < 2:
            continue
        # a known column name, or names only (no spaces): a header, not a prompt
        header = any(c in _header_keys() for c in cells) or all(
            re.fullmatch(r"[a-z_][a-z0-9_]*", c) for c in cells
        )
        # every line cut into the same number of cells: columns, not punctuation in prompts
        columns = len(rows) > 1 and len({len(row) for row in split}) == 1
        if header or columns:
            raise ValueError(
                f"{where}: the first line {first[:80]!r} looks like a "
                f"{'header' if header else 'row'} of {name}-separated columns, which is not read "
                "as a table (only comma-separated CSV is): save it with commas (a header naming "
                "the columns, e.g. prompt,response), or, if it really is one prompt per line, "
                "name the format lines with --safety-format / --data-format (format='lines' in "
                "Python)"
            )


def _read_text(text: str, suffix: str, where: str, header: bool) -> tuple[list[Any], str, bool]:
    """CSV with a known header, or (the flag: lines format) a headerless one-column CSV or one
    prompt per line."""
    lines = text.splitlines()
    first = next(line for line in lines if line.strip())
    if header and _known_header(first):
        return [dict(r) for r in csv.DictReader(lines)], "csv", False
    if header:  # detected, not asked for: a table this reader cannot read is an error
        _refuse_table_as_lines(lines, where)
    if suffix != ".csv":  # plain text: commas belong to the prompt
        return [{"prompt": line.strip()} for line in lines if line.strip()], "text", True
    records = []
    for i, cells in enumerate(csv.reader(lines), 1):
        cells = [c for c in cells if c.strip()]
        if len(cells) > 1:
            raise ValueError(
                f"{where}:{i}: {len(cells)} columns and no header naming them (first row "
                f"{first[:80]!r}); add a header with one of: {_expected()}; or {_override_hint()}"
            )
        if cells:
            records.append({"prompt": cells[0]})
    return records, "csv", True


def _read_hf(path: Path, split: str | None) -> tuple[list[Any], str]:
    import datasets  # imported here: it takes a second and only this container needs it

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{path}: a directory, but not a dataset written by datasets' save_to_disk ({err})"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        name = split or "train"
        if name not in data:
            raise ValueError(
                f"{path}: no split {name!r}; the splits are {splits}; choose one as "
                f"'{path}::SPLIT' (or split= in Python)"
            )
        data = data[name]
    elif split is not None:
        raise ValueError(f"{path}: a single Dataset has no splits; drop '::{split}'")
    return data.to_list(), "hf"


def _split_path(path: str | Path, split: str | None) -> tuple[Path, str | None]:
    """``DIR::SPLIT`` selects a split of a saved DatasetDict (when no file has that name)."""
    text = str(path)
    if split is None and "::" in text and not Path(text).exists():
        text, split = text.rsplit("::", 1)
    return Path(text), split


def load_data(
    path: str | Path, role: Role = "safety", *, format: str = "auto", split: str | None = None
) -> LoadedRows:
    """Read a data file in any of ``FORMATS`` into (prompt, response) rows.

    ``role="data"`` (fine-tuning set): every row needs a response. ``role="safety"`` (safety or
    eval prompts): responses, where present, are the aligned reference responses; AdvBench
    ``target`` strings are harmful-compliance openers ("Sure, here is..."), the opposite of an
    aligned answer, so they are dropped (with a note) and the model's own responses are used.
    ``format``: "auto" or a key of ``FORMATS``, or "hf" (a saved dataset, columns detected).
    ``split``: the split of a saved ``DatasetDict`` (default "train"; also ``DIR::SPLIT``).

    Args:
        path: a JSONL, JSON, CSV or text file, or a ``save_to_disk`` folder (``DIR::SPLIT``).
        role: ``"safety"`` (prompts, responses optional) or ``"data"`` (responses required).
        format, split: see above.

    Returns:
        :class:`LoadedRows`: the rows (``{"prompt", "response"?}``), the detected format and
        notes on what was dropped; ``summary()`` is what results.json records.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: an empty file, a file that is not UTF-8 text, columns that fit no format
            (the message names the columns found and the ``--safety-format`` /
            ``--data-format`` override), or fine-tuning rows without responses.
    """
    if format != "auto" and format not in FORMATS and format not in CONTAINERS:
        raise ValueError(f"format {format!r}: use auto, {', '.join([*FORMATS, *CONTAINERS])}")
    p, split = _split_path(path, split)
    where, lines = str(p), False
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir() or format == "hf":
        if not p.is_dir():
            raise ValueError(f"{p}: format hf needs a directory written by save_to_disk")
        records, source = _read_hf(p, split)
    else:
        try:
            text = p.read_text(encoding="utf-8-sig")  # spreadsheet exports start with a BOM
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{p}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                "a binary file (e.g. Parquet, Excel, a compressed archive) or text in another "
                "encoding; pass a JSON, JSONL, CSV or text file saved as UTF-8 (e.g. "
                "`iconv -f latin1 -t utf-8`), or a directory written by datasets' save_to_disk"
            ) from None
        if not text.strip():
            raise ValueError(f"{p}: the dataset is empty")
        if format == "lines":  # never JSON, never a header
            records, source, lines = _read_text(text, p.suffix.lower(), where, header=False)
        elif p.suffix.lower() in (".json", ".jsonl") or _looks_json(text):
            records, source = _read_json(text, where)
        else:
            records, source, lines = _read_text(text, p.suffix.lower(), where, header=True)
    if not isinstance(records, list):
        raise ValueError(f"{p}: expected a JSON list of objects (or JSONL), got a JSON object")
    if not records:
        raise ValueError(f"{p}: the dataset is empty")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{p}: record {bad + 1} is not an object: {str(records[bad])[:80]!r}")
    columns = list(records[0])
    name = format if format in FORMATS else "lines" if lines else _detect(columns, where)
    return _to_rows(records, name, role, source, where)


def _to_rows(records: list[dict], name: str, role: Role, source: str, where: str) -> LoadedRows:
    fmt = FORMATS[name]
    keep_response = role == "data" or fmt.safety_response
    out = LoadedRows([], name, source, where)
    dropped = 0
    for i, rec in enumerate(records, 1):
        low = {str(k).strip().lower(): v for k, v in rec.items()}
        try:
            prompt, response = fmt.row(low)
        except KeyError as err:
            raise ValueError(
                f"{where}: record {i} has no {err} column for format {name} ({fmt.columns}); "
                f"found {list(rec)}; or {_override_hint()}"
            ) from None
        except ValueError as err:
            raise ValueError(f"{where}: record {i}: {err}") from None
        if prompt is None or not str(prompt).strip():
            out.skipped += 1
            continue
        row = {"prompt": str(prompt)}
        if response is not None and keep_response:
            row["response"] = str(response)
        dropped += response is not None and not keep_response
        out.rows.append(row)
    if not out.rows:
        raise ValueError(f"{where}: the dataset is empty (all {len(records)} prompts are empty)")
    if dropped:
        out.notes.append(
            f"{dropped} {name} responses dropped: they are not aligned answers, so the model's "
            "own greedy responses are the reference"
        )
    if role == "data":
        missing = sum("response" not in r for r in out.rows)
        if missing:
            raise ValueError(
                f"{where}: {missing} of {len(out.rows)} rows have no response; fine-tuning data "
                f"needs one on every row (format {name} reads {fmt.columns}); if that is not the "
                "format, name it with --data-format (format= in Python)"
            )
    return out


def load_rows(
    path: str | Path, require_response: bool = False, *, format: str = "auto"
) -> list[Row]:
    """Rows ``{"prompt", ["response"]}``: :func:`load_data` with ``role="data"`` when
    ``require_response`` (fine-tuning data), else ``role="safety"``."""
    return load_data(path, "data" if require_response else "safety", format=format).rows
