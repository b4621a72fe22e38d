"""The README's main job: the end-to-end demo finds every published copy and flags nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from hashdb.demo import main


@pytest.mark.slow
def test_demo_finds_every_copy_and_removes_its_temporary_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "demo-work"

    def mkdtemp(prefix: str = "") -> str:  # the demo's temporary folder, at a place the test can look
        workdir.mkdir()
        return str(workdir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    assert main(["--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "found 12/12 copies" in out and "layer codes stored" in out
    assert "WRONG" not in out and out.count("/ stolen backbone") == 2  # a backbone inside a bigger model, each
    assert f"hashdb demo in {workdir}" in out and f"removed {workdir}" in out
    assert not workdir.exists()  # no --dir: nothing left behind
    for name in ("plain-seed0", "bn-seed1"):  # each original its own seed
        assert f"trained {name}" in out


def test_demo_refuses_zero_seeds_before_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(tmp_path / "d"), "--seeds", "0"])
    assert exc.value.code == 2 and not (tmp_path / "d").exists()
