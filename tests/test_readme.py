"""The README's examples run and do what they say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue()


def test_readme_hand_written_loop_trains():
    out = _run(_blocks()[0])
    accuracy = float(re.search(r"accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 90.0, out


def test_readme_fit_example_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _run(_blocks()[1])
    accuracy = float(re.search(r"'accuracy': ([\d.]+)", out).group(1))
    assert accuracy > 0.95, out
    assert (tmp_path / "ckpt.safetensors").is_file()


def test_readme_cnn_example_trains():
    out = _run(_blocks()[2])
    accuracy = float(re.search(r"'accuracy': ([\d.]+)", out).group(1))
    assert accuracy > 0.95, out
