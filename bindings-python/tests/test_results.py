"""Rich results of ``run_code`` on the WASI tier: ``Execution.results`` as ``dormant.Result``."""

from __future__ import annotations

import dataclasses
import pathlib
import struct

import pytest

import dormant


def make(store: pathlib.Path) -> dormant.Sandbox:
    return dormant.Sandbox.create("wasi", store=store, idle_standby=None)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_the_shape_of_results() -> None:
    fields = [(f.name, f.default) for f in dataclasses.fields(dormant.Result)]
    assert fields == [
        ("text", None),
        ("html", None),
        ("markdown", None),
        ("png", None),
        ("svg", None),
        ("json", None),
        ("is_main_result", False),
    ]
    r = dormant.Result(text="1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.text = "2"  # type: ignore[misc]
    names = [f.name for f in dataclasses.fields(dormant.Execution)]
    assert names == ["stdout", "stderr", "error", "results"]
    assert dormant.Execution("", "", None).results == []


def test_charts_and_frames_come_back_as_results(store: pathlib.Path) -> None:
    sb = make(store)
    ex = sb.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(3, 2), dpi=40)\n"
        "plt.plot([1, 2, 4])\n"
        "plt.show()\n"
        "plt.figure(figsize=(2, 2), dpi=30)\n"
        "plt.scatter([1], [2])\n"
        "{'answer': 42}"
    )
    assert ex.error is None, ex.error
    assert ex.stdout == "{'answer': 42}\n", "stdout is unchanged by rich results"
    shown, main, left_open = ex.results
    assert isinstance(shown, dormant.Result)
    assert shown.png is not None and png_size(shown.png) == (120, 80)
    assert (shown.text, shown.html, shown.is_main_result) == (None, None, False)
    assert main == dormant.Result(text="{'answer': 42}", is_main_result=True)
    assert left_open.png is not None and png_size(left_open.png) == (60, 60)

    ex = sb.run_code(
        "import pandas as pd\n"
        "class J:\n"
        "    def _repr_json_(self): return {'k': [1, 2.5, None, True]}\n"
        "    def _repr_markdown_(self): return '*hi*'\n"
        "pd.DataFrame({'col_one': [1], 'col_two': [2]})"
    )
    (frame,) = ex.results
    assert frame.is_main_result and frame.text == ex.stdout.rstrip("\n")
    assert frame.html is not None and "col_one" in frame.html and "col_two" in frame.html
    (j,) = sb.run_code("J()").results
    assert j.json == {"k": [1, 2.5, None, True]} and j.markdown == "*hi*"

    ex = sb.run_code("plt.plot([1])\nraise ValueError('late')")
    assert ex.error is not None and ex.error.name == "ValueError"
    assert [r.png is not None for r in ex.results] == [True]
    assert sb.run_code("len(plt.get_fignums())").stdout == "0\n", "no figure leaks"

    sb.standby()
    ex = sb.run_code("plt.figure(figsize=(1, 1), dpi=50)\nplt.title('resumed')\nplt.show()")
    assert ex.error is None, ex.error
    (chart,) = ex.results
    assert chart.png is not None and png_size(chart.png) == (50, 50)
    sb.kill()
