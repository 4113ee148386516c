"""The Python API example of docs/python-api.md (the README links to it) runs as written, and does what its comments
say."""

from pathlib import Path

import torch

PYTHON_API = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def python_example(text: str, heading: str) -> str:
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_python_api_example_runs(capsys):
    namespace = {}
    exec(compile(python_example(PYTHON_API.read_text(), "# Python API"), "docs/python-api.md", "exec"), namespace)
    curve, a, b = namespace["curve"], namespace["a"], namespace["b"]
    assert len(namespace["losses"]) == 5 and namespace["barrier"] >= 0.0
    assert set(namespace["state"]) == set(a.state_dict())
    for t, net in ((0.0, a), (1.0, b)):  # the ends stayed at the endpoints (fixed by default)
        ends = curve.state_dict_at(t)
        assert all(torch.equal(ends[n], p.detach()) for n, p in net.named_parameters())
    assert not torch.equal(curve.bends[1], (curve.bends[0] + curve.bends[2]) / 2)  # the middle bend trained
    assert "barrier" in capsys.readouterr().out
