"""Each benchmark owns one marked section of bench/RESULTS.md and rewrites only that section."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# hashdb benchmark results\n\nEach section is rewritten by the script named in it; see its command line.\n"


def machine_line() -> str:
    return (
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {sys.version.split()[0]}, {platform.system()} {platform.release()}"
    )


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran ``script`` (a path under the repository, e.g. bench/x.py), for a section's header."""
    return shlex.join(["python3", script, *(sys.argv[1:] if argv is None else argv)])


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between the markers for ``name`` in bench/RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def publish(name: str, title: str, script: str, lines: list[str], write: bool = True) -> str:
    """A section of bench/RESULTS.md: ``## title``, the command line that ran ``script``, the machine, then
    ``lines``; printed, and written to the section ``name`` when ``write``. Returns its text."""
    body = "\n".join([f"## {title}", "", f"`{command(script)}`", "", machine_line(), "", *lines])
    print(body)
    if write:
        write_section(name, body)
    return body
