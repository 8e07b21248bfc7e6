"""`orpo report` on run folders a person did not write: the page escapes every value it shows and
runs no script, and a file it cannot read is one line naming the file and line (exit 2), never a
traceback."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orpo.cli import main
from orpo.report import NotARunError, load_run, write_report

XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(1)</script>"
# every tag the page writes itself; anything else came from a run folder
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td",
             "span", "img", "code", "ul", "li", "b", "details", "summary", "pre"}


def _rows(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _plain_run(path: Path) -> Path:
    """The least a run folder holds: one train and one eval row."""
    path.mkdir(parents=True)
    _rows(path / "metrics.jsonl", [{"step": 0, "loss": 1.0}, {"step": 0, "eval_loss": 1.0, "eval_accuracy": 0.5}])
    return path


def _hostile_run(root: Path) -> Path:
    """A run whose every user-controlled value carries markup: folder name, metric keys and values,
    warnings, samples, config and data summary."""
    run = root / XSS
    run.mkdir(parents=True)
    _rows(run / "metrics.jsonl", [
        {"step": 0, "loss": 1.0, "nll_loss": XSS, XSS: 1.0, SCRIPT: SCRIPT},
        {"step": 1, "loss": 0.5, "lr": XSS, "grad_norm": SCRIPT},
        {"step": 0, "eval_loss": 1.0, "eval_accuracy": XSS, "eval_margin": SCRIPT, "eval_logps_chosen": [XSS],
         "eval_nll_loss": {XSS: SCRIPT}},
        {"step": 1, "eval_loss": 0.9, "eval_log_odds_ratio": XSS, "eval_logps_rejected": SCRIPT},
        {"step": 1, "warning": XSS, "message": SCRIPT},
    ])
    _rows(run / "samples.jsonl", [{"step": 1, "prompt": XSS, "completion": SCRIPT, "chosen": XSS + "'\"",
                                   "rejected": {"x": XSS}}])
    (run / "config.yaml").write_text(json.dumps({"orpo": {"objective": XSS, "beta": SCRIPT},
                                                 XSS: [SCRIPT, {"k": XSS}]}))
    (run / "data_summary.json").write_text(json.dumps({
        "source": XSS, "eval_source": SCRIPT, "format": XSS, "template": SCRIPT, "pairs": XSS,
        "train_size": SCRIPT, "eval_size": XSS, "dropped": {XSS: SCRIPT}, "truncated": XSS, "max_length": SCRIPT,
        "lengths": {XSS: {"p50": SCRIPT, "p90": XSS, "max": SCRIPT}, "odd": XSS},
    }))
    return run


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


def test_every_value_from_a_run_folder_is_escaped_and_the_page_runs_no_script(tmp_path):
    run = _hostile_run(tmp_path / "runs")
    page = write_report([run, _plain_run(tmp_path / "runs" / "plain")], tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(text)
    parser.close()
    assert {tag for tag, _ in parser.tags} <= PAGE_TAGS
    assert not [(t, a) for t, attrs in parser.tags for a, _ in attrs if a.lower().startswith("on")]
    assert "script" not in {tag for tag, _ in parser.tags}
    images = [dict(attrs) for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 4 and all((i.get("src") or "").startswith("data:image/png;base64,") for i in images)
    csp = [dict(attrs) for tag, attrs in parser.tags
           if tag == "meta" and (dict(attrs).get("http-equiv") or "").lower() == "content-security-policy"]
    assert len(csp) == 1
    policy = {d.split()[0]: d.split()[1:] for d in (csp[0]["content"] or "").split(";") if d.strip()}
    assert policy["default-src"] == ["'none'"] and "script-src" not in policy
    assert policy["img-src"] == ["data:"] and policy["style-src"] == ["'unsafe-inline'"]
    # in force before any content
    assert text.index("Content-Security-Policy") < text.index("<style>")
    # the values are there, as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;script&gt;" in text


def test_a_dollar_in_a_run_name_is_not_read_as_matplotlib_math(tmp_path):
    run = _plain_run(tmp_path / "a")
    page = write_report([run], tmp_path / "out", names=[r"a $\frac{$ b"])
    assert r"a $\frac{$ b" in page.read_text(encoding="utf-8")


def _report(capsys, *runs: Path, out: Path) -> str:
    capsys.readouterr()
    rc = main(["report", *map(str, runs), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("orpo report: error: "), err
    assert not out.exists()
    return err


DEEP = "[" * 100_000 + "]" * 100_000
BAD_FILES = [
    # (file, content, what the message says)
    ("config.yaml", "- a\n- b\n", "config.yaml: expected a mapping of settings, got a list"),
    ("config.yaml", "just words\n", "config.yaml: expected a mapping of settings, got a str"),
    ("config.yaml", "a: [1\nb: 2\n", "config.yaml line 2: not YAML"),
    ("config.yaml", b"orpo:\n  beta: \xff\xfe\x00bad\n", "config.yaml line 2: not UTF-8 (byte 14"),
    ("config.yaml", "orpo: [1, 2]\n", "config.yaml: orpo: expected a mapping, got a list"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n' + DEEP + "\n", "metrics.jsonl line 2: nested too deeply"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n\n[1, 2]\n', "metrics.jsonl line 3: expected a JSON object, got list"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n"x"\n', "metrics.jsonl line 2: expected a JSON object, got str"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n{"loss": 2}\n', "metrics.jsonl line 2: 'step' is missing or not"),
    ("metrics.jsonl", '{"step": "0", "loss": 1}\n', "metrics.jsonl line 1: 'step' is missing or not"),
    ("metrics.jsonl", '{"step": 1e400, "loss": 1}\n', "metrics.jsonl line 1: 'step' is missing or not"),
    ("metrics.jsonl", json.dumps({"step": XSS, "loss": 1}), "metrics.jsonl line 1: 'step' is missing or not"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n{"step": 1,\n{"step": 2, "loss": 1}\n',
     "metrics.jsonl line 2: not JSON"),
    ("metrics.jsonl", b'{"step": 0, "loss": 1}\n\xff\xfe\x00bad\n', "metrics.jsonl line 2: not UTF-8 (byte 23"),
    ("metrics.jsonl", '{"step": 0, "loss": ' + "9" * 5000 + "}\n", "metrics.jsonl line 1: not JSON"),
    ("samples.jsonl", DEEP, "samples.jsonl line 1: nested too deeply"),
    ("samples.jsonl", "[]\n", "samples.jsonl line 1: expected a JSON object, got list"),
    ("samples.jsonl", b"\xff\xfe\x00bad", "samples.jsonl line 1: not UTF-8 (byte 0"),
    ("data_summary.json", "[1]", "data_summary.json: expected a JSON object, got list"),
    ("data_summary.json", DEEP, "data_summary.json: nested too deeply"),
    ("data_summary.json", '{\n"a": }', "data_summary.json line 2: not JSON"),
    ("data_summary.json", b"{}\n\n\xff", "data_summary.json line 3: not UTF-8 (byte 4"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[f"{n}-{i}" for i, (n, _, _) in
                                                                        enumerate(BAD_FILES)])
def test_a_file_the_report_cannot_read_is_one_line_naming_file_and_line(tmp_path, capsys, name, content, message):
    run = _plain_run(tmp_path / "run")
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _report(capsys, run, out=tmp_path / "out")
    assert str(run / name) in err and message in err, err
    with pytest.raises(NotARunError):
        load_run(run)


def test_a_metrics_line_being_written_is_left_out(tmp_path):
    """A live run appends rows: a last line without its newline yet is not an error."""
    run = _plain_run(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')
    assert [r["step"] for r in load_run(run).train] == [0]


def test_sample_text_with_line_separators_reads_as_one_row(tmp_path):
    """samples.jsonl is written with ensure_ascii=False: U+2028 and U+0085 inside a string are not line ends."""
    run = _plain_run(tmp_path / "run")
    row = {"step": 0, "prompt": "a\u2028b", "completion": "c\x85d", "chosen": "e", "rejected": "f"}
    (run / "samples.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_run(run).samples == [row]


def test_odd_values_and_names_still_make_a_page(tmp_path):
    """Numbers too large for a float, lone surrogates, non-numeric objective settings: shown, not fatal."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "loss": ' + "9" * 400 + ', "nll_loss": "\\ud800"}\n'
        '{"step": 0, "eval_loss": 1.0, "eval_accuracy": "\\udcff", "eval_margin": ' + "9" * 400 + "}\n"
        '{"step": 1, "warning": "\\ud800", "message": "\\ud800"}\n')
    (run / "config.yaml").write_text('orpo: {objective: dpo, dpo_beta: "high"}\nx: "\\ud800"\n')
    page = write_report([run], tmp_path / "out", names=["run \udcff"])
    text = page.read_text(encoding="utf-8")
    assert "dpo β=high" in text
    assert json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))[0]["objective"] == "dpo β=high"
