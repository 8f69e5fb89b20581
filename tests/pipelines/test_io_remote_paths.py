"""Paths on a remote (Spark Connect) engine: ``pipelines.io.engine_path`` and ``resolve_output`` (no Spark).

The job writes the demo catalog and reads its tables back in the client's process, so a relative path must
name the same folder for the client and the server: it is made absolute against the client's working
directory, not left for the server to resolve against its own. Everything else stays the server's to resolve.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.io import engine_path, resolve_output


@pytest.mark.parametrize("given", ["work/tables", "./work/tables", "file:work/tables"])
def test_a_relative_path_is_the_clients_folder(given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert engine_path(given, "remote") == str(tmp_path / "work" / "tables")
    location = resolve_output(given, None, "delta", engine="remote")
    assert location.root == str(tmp_path / "work" / "tables")
    assert not (tmp_path / "work").exists()  # the server creates it: no local folder (nor safe link) here


@pytest.mark.parametrize("given", ["/data/semids", "/data/a b#1", "file:///data/semids", "s3://lake/semids",
                                   "dbfs:/mnt/semids", "abfss://c@a.dfs.core.windows.net/semids"])
def test_absolute_paths_and_uris_stay_the_servers(given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert engine_path(given, "remote") == given


def test_a_glob_character_is_still_refused() -> None:
    with pytest.raises(ValueError, match=r"glob pattern"):
        engine_path("work/t*bles", "remote")
