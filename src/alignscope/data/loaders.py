"""Reading (prompt, response) rows from files.

Formats read here: JSONL or JSON lists of objects with ``prompt`` (+ ``response``), Alpaca-style
``instruction``/``input``/``output``, Dolly ``instruction``/``context``/``response``, chat
``messages``; CSV with a header (``prompt``/``goal`` and optionally ``response``/``target``); plain
text with one prompt per line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

Row = dict[str, str]

_PROMPT_KEYS = ("prompt", "goal", "instruction", "question")
_RESPONSE_KEYS = ("response", "target", "output", "completion", "answer")


def _from_object(obj: dict, where: str) -> Row:
    if "messages" in obj:
        msgs = obj["messages"]
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        bots = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not users:
            raise ValueError(f"{where}: a 'messages' row has no user turn")
        row = {"prompt": users[0]}
        if bots:
            row["response"] = bots[0]
        return row
    key = next((k for k in _PROMPT_KEYS if k in obj), None)
    if key is None:
        raise ValueError(
            f"{where}: no prompt column; found {sorted(obj)}; expected one of "
            f"{list(_PROMPT_KEYS)} (optionally with one of {list(_RESPONSE_KEYS)}) or 'messages'"
        )
    prompt = str(obj[key])
    extra = obj.get("input") or obj.get("context")
    if key == "instruction" and extra:
        prompt = f"{prompt}\n\n{extra}"
    row = {"prompt": prompt}
    rkey = next((k for k in _RESPONSE_KEYS if k in obj), None)
    if rkey is not None and obj[rkey] is not None:
        row["response"] = str(obj[rkey])
    return row


def load_rows(path: str | Path, require_response: bool = False) -> list[Row]:
    """Rows ``{"prompt": ..., ["response": ...]}`` from a data file; errors name the fix."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    rows: list[Row]
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{i}: not valid JSON ({err.msg})") from None
                rows.append(_from_object(obj, f"{p}:{i}"))
    elif suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of objects")
        rows = [_from_object(o, f"{p}[{i}]") for i, o in enumerate(data)]
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [_from_object(dict(r), f"{p}:{i + 2}") for i, r in enumerate(reader)]
    elif suffix in (".txt", ""):
        rows = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        raise ValueError(f"{p}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .txt")
    if not rows:
        raise ValueError(f"{p}: the dataset is empty")
    if require_response:
        missing = sum("response" not in r for r in rows)
        if missing:
            raise ValueError(
                f"{p}: {missing} of {len(rows)} rows have no response; fine-tuning data needs "
                f"one of {list(_RESPONSE_KEYS)} on every row"
            )
    return rows
