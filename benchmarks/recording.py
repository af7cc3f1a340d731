"""Results files written beside the benchmark that made them: ``<out>.json`` (the summary,
the per-record details and how it was run) and ``<out>.md`` (the table), each stamped with
the commit, date, machine, thread count and the exact command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def run_info() -> dict:
    """Commit (with ``+dirty`` for uncommitted changes), UTC date, machine, torch threads and
    the command line of this run."""
    import torch

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}",
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def percent(scores: dict) -> dict:
    """An evaluation average with its shares and margins in percent, as the tables print
    them (``edit.evals.report.summary_table``); KL, GE and PPL as they are."""
    from edit.evals.report import MARGINS, SHARES

    return {k: 100 * v if k in SHARES or k in MARGINS else v for k, v in scores.items()}


def write_results(out: str | Path, summary: dict, table: str, details: dict) -> None:
    """Write ``<out>.json`` (run info, ``summary``: the figures a README row quotes, and
    ``details``) and ``<out>.md`` (run info and ``table``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = run_info()
    out.with_suffix(".json").write_text(
        json.dumps({"run": info, "summary": summary, **details}, indent=1, default=str) + "\n"
    )
    head = "\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                     for k, v in info.items())  # fmt: skip
    out.with_suffix(".md").write_text(f"# {out.stem}\n\n{head}\n\n{table}\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
