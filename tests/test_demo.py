"""The README's main job: the end-to-end demo finds every published copy and flags nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from hashdb import HashDB
from hashdb.demo import main


@pytest.mark.slow
def test_demo_finds_every_copy_of_its_trained_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dir", str(tmp_path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "found 10/10 copies" in out
    assert "WRONG" not in out
    with HashDB(str(tmp_path / "db")) as db:
        assert sorted(db) == ["bn-seed0", "plain-seed0"]
        assert db.get("bn-seed0")[1]["file"].endswith("bn-seed0.pt")
