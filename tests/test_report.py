"""The HTML evidence page, rendered in a real browser (headless Chromium) and checked through its DOM."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evidence_helpers import save, trained

from hashdb.cli import EXIT_OK, main
from hashdb.codec.hasher import ModelHasher
from hashdb.db import HashDB
from hashdb.evidence import compare
from hashdb.evidence.report import html_page

pytest.importorskip("matplotlib", reason="the report extra (pip install hashdb[report])")
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--dump-dom"]  # fmt: skip


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM after Chromium loaded ``page`` (scripts run, images decoded); a fresh profile, no network."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", page.as_uri()],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class DomSummary(html.parser.HTMLParser):
    """What the checks need from a DOM: images (with their sources), svg elements, the verdict's text and
    the JSON block."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.svgs = 0
        self.verdict = ""
        self.json_text = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "svg":
            self.svgs += 1
        elif a.get("id") == "verdict":
            self._in = "verdict"
        elif tag == "script" and a.get("type") == "application/json":
            self._in = "json"

    def handle_endtag(self, tag: str) -> None:
        if (self._in == "verdict" and tag == "p") or (self._in == "json" and tag == "script"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "verdict":
            self.verdict += data
        elif self._in == "json":
            self.json_text += data


def summary(dom: str) -> DomSummary:
    parsed = DomSummary()
    parsed.feed(dom)
    return parsed


def test_compare_page_renders_with_verdict_plots_and_its_json(tmp_path):
    a, b = save("original", tmp_path), save("finetune", tmp_path)
    assert main(["compare", str(a), str(b), "--html", str(tmp_path / "pair.html"), "--permutations", "99"]) == 0
    page = summary(rendered_dom(tmp_path / "pair.html", tmp_path / "profile"))
    assert page.verdict.startswith("derived: Not independent")
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    doc = json.loads(page.json_text)
    assert doc["verdict"]["call"] == "derived" and doc["test"]["n_perm"] == 99 and doc["b"] == str(b)


def test_suspect_report_shows_matches_the_null_and_the_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hasher = ModelHasher(256)
    with HashDB("db", bits=256) as db:
        db.set_codec(hasher.config)
        for name in ("original", "finetune", "independent1"):
            path = save(name, tmp_path)
            db.insert(path.name, hasher.hash(path), {"path": str(path)})
    suspect = save("finetune2", tmp_path, "suspect.npz")
    assert main(["report", "db", str(suspect), "-o", "report.html", "--permutations", "99"]) == EXIT_OK
    page = summary(rendered_dom(tmp_path / "report.html", tmp_path / "profile"))
    assert page.verdict.startswith("copy: ")
    assert "original.npz" in page.verdict and "finetune.npz" in page.verdict
    assert len(page.images) == 4  # per-layer similarity, the null with the fmr, weight differences, the tree
    doc = json.loads(page.json_text)
    assert doc["kind"] == "suspect" and doc["tree"]["root"] == "original.npz"
    assert {m["key"] for m in doc["matches"]} >= {"original.npz", "finetune.npz"}
    assert all(0 <= m["fmr"] <= 1 for m in doc["matches"])


def test_json_block_cannot_end_the_script_early():
    result = compare(trained("original"), trained("finetune"), n_perm=9, bits=None)
    result["a"] = "</script><script>alert(1)</script>"
    page = html_page(result)
    parsed = summary(page)
    assert json.loads(parsed.json_text)["a"] == result["a"]
    assert "<script>alert" not in page


def test_a_suspect_far_from_everything_is_no_match_with_its_nearest_shown(tmp_path):
    from hashdb.evidence.report import suspect_report

    hasher = ModelHasher(256)
    with HashDB(tmp_path / "db", bits=256) as db:
        db.set_codec(hasher.config)
        path = save("independent1", tmp_path)
        db.insert("independent1", hasher.hash(path), {"path": str(path)})
        doc = suspect_report(db, save("original", tmp_path), radius=0, n_perm=9)
    assert not doc["within_radius"] and doc["verdict"]["call"] == "no match"
    assert [m["key"] for m in doc["matches"]] == ["independent1"]
    assert doc["matches"][0]["compare"]["verdict"]["call"] == "no evidence"
    page = summary(html_page(doc))
    assert page.verdict.startswith("no match: No stored model within 0 bits")
    assert json.loads(page.json_text)["matches"][0]["distance"] > 0


def test_importing_the_evidence_package_loads_no_heavy_dependency(repo):
    code = ("import sys, hashdb.evidence, hashdb.evidence.report, hashdb.evidence.lineage; "
            "print(sorted(m for m in ('torch', 'numba', 'scipy', 'matplotlib') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
