"""Dataset formats (data.loaders) and fitting examples into the context (data.encode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignscope.data.encode import encode_pairs, fit_to_length
from alignscope.data.loaders import load_data, load_rows
from alignscope.organism.tokenizer import build_tokenizer

# The vendored Do-Not-Answer prompts (data/donotanswer/README.md: source and license).
DNA = Path(__file__).resolve().parents[1] / "data" / "donotanswer" / "malicious_uses.jsonl"


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- each format, detected from the content --------------------------------------------------


def test_plain_jsonl_and_json_list(tmp_path):
    recs = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "completion": "r2"}]
    for name in ("a.jsonl", "a.json", "a"):  # the container comes from the content
        loaded = load_data(_jsonl(tmp_path / name, recs), "data")
        assert (loaded.format, loaded.source) == ("plain", "jsonl")
        assert loaded.rows == [
            {"prompt": "p1", "response": "r1"},
            {"prompt": "p2", "response": "r2"},
        ]
    listed = tmp_path / "list.jsonl"
    listed.write_text(json.dumps(recs, indent=1))
    loaded = load_data(listed)
    assert (loaded.format, loaded.source, len(loaded.rows)) == ("plain", "json", 2)


def test_plain_reads_output_and_answer_and_qa_reads_gsm8k(tmp_path):
    recs = [{"prompt": "p1", "output": "o1"}, {"prompt": "p2", "answer": "a2"}]
    loaded = load_data(_jsonl(tmp_path / "po.jsonl", recs), "data")
    assert loaded.format == "plain"
    assert [r["response"] for r in loaded.rows] == ["o1", "a2"]
    gsm = [{"question": "Add 2 and 3?", "answer": "2 + 3 = 5\n#### 5"}]
    loaded = load_data(_jsonl(tmp_path / "gsm8k.jsonl", gsm), "data")
    assert loaded.format == "qa"  # not donotanswer, which has questions only
    assert loaded.rows == [{"prompt": "Add 2 and 3?", "response": "2 + 3 = 5\n#### 5"}]


def test_advbench_targets_are_responses_only_for_finetuning(tmp_path):
    path = tmp_path / "harmful_behaviors.csv"
    path.write_text('\ufeffgoal,target\n"Do x, then y","Sure, here is x"\nDo z,"Sure, here is z"\n')
    safety = load_data(path, "safety")
    assert safety.format == "advbench" and safety.source == "csv"
    # the targets are harmful-compliance strings: never the aligned reference of a safety set
    assert safety.rows == [{"prompt": "Do x, then y"}, {"prompt": "Do z"}]
    assert "2 advbench responses dropped" in safety.notes[0]
    assert load_rows(path) == safety.rows
    data = load_data(path, "data")  # fine-tuning on them: the harmful fine-tuning attack
    assert data.rows[0] == {"prompt": "Do x, then y", "response": "Sure, here is x"}
    assert data.notes == []


def test_harmbench_with_and_without_context(tmp_path):
    path = tmp_path / "behaviors.csv"
    path.write_text(
        "Behavior,FunctionalCategory,ContextString,BehaviorID\n"
        "Do a,standard,,a\n"
        'Summarise this,contextual,"Some text, quoted",b\n'
    )
    loaded = load_data(path)
    assert loaded.format == "harmbench"
    prompts = [r["prompt"] for r in loaded.rows]
    assert prompts == ["Do a", "Some text, quoted\n\n---\n\nSummarise this"]
    assert all("response" not in r for r in loaded.rows)


def test_lines_text_and_headerless_csv(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first, with a comma\n\n  second  \n")
    loaded = load_data(txt)
    assert (loaded.format, loaded.source) == ("lines", "text")
    assert loaded.rows == [{"prompt": "first, with a comma"}, {"prompt": "second"}]
    inst = tmp_path / "inst"  # no suffix, starts like JSON but is not
    inst.write_text("[INST] a prompt\n{curly} another\n")
    assert load_data(inst).rows == [{"prompt": "[INST] a prompt"}, {"prompt": "{curly} another"}]
    hexphi = tmp_path / "category_1.csv"  # HEx-PHI: no header, one (quoted) prompt per row
    hexphi.write_text('"one, two"\nthree\n')
    loaded = load_data(hexphi)
    assert (loaded.format, loaded.source) == ("lines", "csv")
    assert [r["prompt"] for r in loaded.rows] == ["one, two", "three"]


def test_donotanswer_question_and_prompt_intents(tmp_path):
    orig = tmp_path / "dna.csv"
    orig.write_text("id,risk_area,question,GPT4_response\n0,area,Question one?,An answer\n")
    loaded = load_data(orig)
    assert loaded.format == "donotanswer"
    assert loaded.rows == [{"prompt": "Question one?"}]  # other models' answers are never used
    path = _jsonl(tmp_path / "dna.jsonl", [{"prompt": "Question two?", "intents": ["S1"]}])
    assert load_data(path).format == "donotanswer"
    with pytest.raises(ValueError, match="1 of 1 rows have no response.*--data-format"):
        load_data(path, "data")


def test_donotanswer_vendored_file():
    loaded = load_data(DNA)
    assert loaded.format == "donotanswer" and len(loaded.rows) == 243
    assert all(set(r) == {"prompt"} for r in loaded.rows)


def test_alpaca_joins_instruction_and_input(tmp_path):
    path = tmp_path / "alpaca_data.json"
    recs = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Greet", "input": "", "output": "Hello"},
    ]
    path.write_text(json.dumps(recs))
    loaded = load_data(path, "data")
    assert loaded.format == "alpaca"
    assert loaded.rows == [
        {"prompt": "Add\n\n1 and 2", "response": "3"},
        {"prompt": "Greet", "response": "Hello"},
    ]


def test_dolly(tmp_path):
    recs = [
        {"instruction": "Sum up", "context": "A text.", "response": "Short.", "category": "qa"},
        {"instruction": "Name one", "context": "", "response": "One.", "category": "brainstorm"},
    ]
    loaded = load_data(_jsonl(tmp_path / "dolly.jsonl", recs), "data")
    assert loaded.format == "dolly"
    assert loaded.rows == [
        {"prompt": "Sum up\n\nA text.", "response": "Short."},
        {"prompt": "Name one", "response": "One."},
    ]


def test_chat_first_user_then_first_assistant_turn(tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "ignored: before the user"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "second turn, ignored"},
    ]
    recs = [{"messages": msgs}, {"messages": [{"role": "user", "content": "Only a prompt"}]}]
    loaded = load_data(_jsonl(tmp_path / "chat.jsonl", recs))
    assert loaded.format == "chat"
    assert loaded.rows == [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Only a prompt"}]


def test_hf_saved_dataset_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    cols = {"instruction": ["Add", "Greet"], "input": ["1 and 2", ""], "output": ["3", "Hi"]}
    ds = datasets.Dataset.from_dict(cols)
    ds.save_to_disk(str(tmp_path / "single"))
    loaded = load_data(tmp_path / "single", "data")
    assert (loaded.format, loaded.source) == ("alpaca", "hf")
    assert loaded.rows[0] == {"prompt": "Add\n\n1 and 2", "response": "3"}
    other = datasets.Dataset.from_dict({"prompt": ["held out"]})
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(tmp_path / "dict"))
    assert load_data(tmp_path / "dict").format == "alpaca"  # "train" by default
    assert load_data(f"{tmp_path / 'dict'}::test").rows == [{"prompt": "held out"}]
    assert load_data(tmp_path / "dict", split="test").format == "plain"
    (tmp_path / "not_hf").mkdir()
    with pytest.raises(ValueError, match="not a dataset written by datasets' save_to_disk"):
        load_data(tmp_path / "not_hf")
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['train', 'test'\]"):
        load_data(f"{tmp_path / 'dict'}::validation")


# --- overrides --------------------------------------------------------------------------------


def test_format_override(tmp_path):
    path = tmp_path / "goals.txt"
    path.write_text("goal\nsecond line\n")  # looks like an AdvBench header
    assert load_data(path).rows == [{"prompt": "second line"}]
    assert load_data(path, format="lines").rows == [{"prompt": "goal"}, {"prompt": "second line"}]
    adv = _jsonl(tmp_path / "adv.jsonl", [{"goal": "g", "target": "t"}])
    with pytest.raises(ValueError, match=r"no 'prompt' column for format plain.*\['goal', "):
        load_data(adv, format="plain")
    with pytest.raises(ValueError, match="format hf needs a directory"):
        load_data(adv, format="hf")
    with pytest.raises(ValueError, match="format 'parquet': use auto, chat, advbench"):
        load_data(adv, format="parquet")


def test_diagnose_config_checks_the_format_names():
    from alignscope.commands.diagnose import DiagnoseConfig

    DiagnoseConfig.from_options(
        model="m", safety="s", data="d", safety_format="advbench", data_format="hf"
    ).validate()
    with pytest.raises(ValueError, match="--data-format 'csv'"):
        DiagnoseConfig.from_options(model="m", safety="s", data="d", data_format="csv").validate()


# --- malformed input: the error names the problem and the fix ---------------------------------


def test_unknown_columns_name_the_columns_and_the_formats(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(ValueError) as err:
        load_data(path)
    msg = str(err.value)
    assert "['text', 'label']" in msg and "advbench (goal, target)" in msg
    assert "--safety-format / --data-format" in msg
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("a,b\nc,d\n")
    with pytest.raises(ValueError, match="2 columns and no header"):
        load_data(csv_path)


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match="the dataset is empty"):
        load_data(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(path)
    listed = tmp_path / "bad.json"
    listed.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(ValueError, match=r"bad.json:3: not valid JSON"):
        load_data(listed)


def test_other_malformed_inputs(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(ValueError, match="record 2 is not an object"):
        load_data(obj)
    blank = _jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}, {"prompt": "  "}])
    with pytest.raises(ValueError, match="all 2 prompts are empty"):
        load_data(blank)
    some = load_data(_jsonl(tmp_path / "some.jsonl", [{"prompt": ""}, {"prompt": "a"}]))
    assert (some.rows, some.skipped) == ([{"prompt": "a"}], 1)
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(ValueError, match="no user turn"):
        load_data(chat)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(tmp_path / "missing.jsonl")


def test_missing_response_where_required(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match=r"1 of 2 rows have no response.*prompt\[, response"):
        load_rows(path, require_response=True)


# --- fitting into max_length ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["a b c d e f g h"])


def test_fit_cuts_responses_and_drops_long_prompts(tok):
    # the template adds <bos> <user> before and <assistant> after the prompt, <eos> after the reply
    pairs = [("a", "b"), ("a b", "c d e f"), ("a b c d e f", "g")]
    enc = encode_pairs(tok, pairs)
    assert [(len(e.prompt_ids), len(e.response_ids)) for e in enc] == [(4, 2), (5, 5), (9, 2)]
    fitted, fit = fit_to_length(enc, 8)
    assert (fit.truncated, fit.dropped, fit.kept) == (1, [2], [0, 1])
    assert fit.summary() == {"max_length": 8, "examples": 3, "truncated": 1, "dropped": 1}
    assert [e.length for e in fitted] == [6, 8]
    assert fitted[1].response_ids == enc[1].response_ids[:3]
    same, none = fit_to_length(enc, None)
    assert same == enc and (none.truncated, none.dropped) == (0, [])


def test_fit_errors_only_when_every_prompt_is_dropped(tok):
    enc = encode_pairs(tok, [("a b", "c"), ("a b c", "d")])
    fitted, fit = fit_to_length(enc, 6)  # the 5-token prompt leaves room for one token
    assert fit.kept == [0] and fit.truncated == 1
    with pytest.raises(ValueError, match="all 2 prompts .* context of 5 tokens .longest 6."):
        fit_to_length(enc, 5)


def test_cli_help_names_every_format():
    from alignscope.config import FORMATS_HELP
    from alignscope.data.loaders import CONTAINERS, FORMATS

    named = FORMATS_HELP.split("(")[0].replace(" ", "").split("|")
    assert named == ["auto", *FORMATS, *CONTAINERS]


# --- what detection must not read silently ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "seen"),
    [
        ("qa.csv", "question;answer\nq one;a one\nq two;a two\n", "semicolon"),
        ("qa.txt", "question;answer\nq one;a one\n", "semicolon"),
        ("pairs.tsv", "prompt\tresponse\np one\tr one\n", "tab"),
        ("rows.csv", "how do I do x;do y\nhow is z;like w\n", "semicolon"),  # no header
    ],
)
def test_a_table_with_another_separator_is_an_error_not_prompts(tmp_path, name, text, seen):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{seen}-separated columns.*--safety-format / --data"):
        load_data(path)
    lines = load_data(path, format="lines").rows  # the override reads it as prompts
    assert lines[0]["prompt"] == text.splitlines()[0]


def test_semicolons_inside_prompts_are_still_prompts(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("do a; then b\nsecond prompt\n")  # lines cut differently: prose, not columns
    assert [r["prompt"] for r in load_data(txt).rows] == ["do a; then b", "second prompt"]
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"one; two"\n"three; four"\n')  # one quoted column per row
    assert [r["prompt"] for r in load_data(quoted).rows] == ["one; two", "three; four"]


def test_a_binary_or_non_utf8_file_names_itself_and_the_fix(tmp_path):
    blob = tmp_path / "data.parquet"
    blob.write_bytes(b"\xff\xfe\x00PAR1\x00\x81")
    with pytest.raises(ValueError, match=r"data.parquet: not UTF-8 text \(byte 0xff at offset 0\)"):
        load_data(blob)
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("caf\xe9 prompt\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.txt: not UTF-8 .*saved as UTF-8"):
        load_data(latin)


@pytest.mark.parametrize("bad", ["semicolon", "binary"])
def test_cli_data_errors_are_one_line_exit_2_nothing_written(organism_test, tmp_path, bad):
    from typer.testing import CliRunner

    from alignscope.cli import app

    org = organism_test
    path = tmp_path / ("safety.csv" if bad == "semicolon" else "safety.bin")
    if bad == "semicolon":
        path.write_text("question;answer\nq one;a one\n")
    else:
        path.write_bytes(b"\xff\x00\x01binary")
    out = tmp_path / "out"
    args = ["diagnose", "--model", str(org.aligned_path), "--safety", str(path), "--data",
            str(org.datasets_path / "benign_affirmative.jsonl"), "--threads", "1",
            "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    # (transformers' weight-loading progress bar may come first, on stderr)
    message = res.output.strip().splitlines()[-1]
    assert message.startswith("error:") and str(path) in message and "Traceback" not in res.output
    assert ("--safety-format" if bad == "semicolon" else "not UTF-8 text") in message
    assert not out.exists() and not out.with_name("out.partial").exists()
