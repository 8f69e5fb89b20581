"""``jobs/check_published_set.py``: the command's exit codes and messages (the checks themselves:
tests/test_published_set.py, through ``pipelines.publish.check_files``)."""
from __future__ import annotations

from jobs.check_published_set import main


def test_a_path_that_is_not_a_folder_is_a_bad_argument(tmp_path, capsys) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist: give the job's --output folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "file")]) == 2
    assert "is a file: give the job's --output folder" in capsys.readouterr().err


def test_a_folder_without_a_published_set_fails_the_check(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL  ") and "no runs table" in out, out
