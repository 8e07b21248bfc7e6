"""Data files that are not UTF-8 (train, eval and ``data.general_eval``): one error naming the file,
the line and the byte offset (exit 2 on the command line), never a UnicodeDecodeError traceback."""

from __future__ import annotations

import gzip
import json

import pytest
from tiny import write_short_pairs

from orpo.cli import main
from orpo.data import DataError
from orpo.data.sources import decode_text, load_rows
from orpo.train.health import read_general_text

BAD = b"\xff\xfe\x00bad"
ROW = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode()


def _files(tmp_path):
    """(path, line, byte offset of the bad byte) for each kind of file a data setting can name."""
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(ROW + b"\n" + ROW + b"\n" + BAD + b"\n")
    as_json = tmp_path / "train.json"
    as_json.write_bytes(b"[\n" + ROW + b",\n" + BAD + b"]")
    as_csv = tmp_path / "train.csv"
    as_csv.write_bytes(b"prompt,chosen,rejected\n" + BAD + b",b,c\n")
    zipped = tmp_path / "train.jsonl.gz"
    zipped.write_bytes(gzip.compress(ROW + b"\n" + BAD))
    return [(jsonl, 3, 2 * (len(ROW) + 1)), (as_json, 3, len(ROW) + 4), (as_csv, 2, 23), (zipped, 2, len(ROW) + 1)]


def test_a_data_file_that_is_not_utf8_is_a_data_error_naming_line_and_byte(tmp_path):
    for path, line, byte in _files(tmp_path):
        with pytest.raises(DataError) as err:
            load_rows(str(path))
        assert str(err.value).startswith(f"{path}: not valid UTF-8 text (line {line}: "), err.value
        assert f"in position {byte}:" in str(err.value), err.value


def test_the_cli_says_it_in_one_line_for_train_and_eval_files(tmp_path, capsys):
    good = write_short_pairs(tmp_path / "good.jsonl", 4)
    for path, line, _ in _files(tmp_path):
        for args in ([str(path)], [str(good), "--eval", str(path)]):
            capsys.readouterr()
            assert main(["audit", *args]) == 2, args
            err = capsys.readouterr().err
            assert "Traceback" not in err and err.count("\n") == 1, err
            assert f"{path}: not valid UTF-8 text (line {line}: " in err, err


def test_decode_text_keeps_a_byte_order_mark_out():
    assert decode_text("\ufeffhé".encode(), "x") == "hé"


@pytest.mark.parametrize("name", ["general.txt", "general.jsonl", "general.jsonl.gz"])
def test_a_general_eval_file_that_is_not_utf8_names_line_and_byte(tmp_path, name):
    content = b'{"text": "fine"}\n' + BAD + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=rf"{path.name}: not valid UTF-8 text \(line 2: .*in position 17"):
        read_general_text(path)
