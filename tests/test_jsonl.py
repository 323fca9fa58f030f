"""The one JSON Lines reader: values with their line numbers, bad lines named."""

import pytest

from genops_assets.lib.jsonl import JsonlError, iter_jsonl, read_jsonl


def test_values_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n"three"\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, [2]), (5, "three")]
    assert read_jsonl(path) == [{"a": 1}, [2], "three"]


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"rows\.jsonl, line 2: invalid JSON"):
        read_jsonl(path)


def test_bytes_that_are_not_utf8_name_the_line_and_the_callers_error_type(tmp_path):
    class TaskError(ValueError):
        pass

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(TaskError, match=r"rows\.jsonl, line 2: not UTF-8"):
        read_jsonl(path, error=TaskError)
