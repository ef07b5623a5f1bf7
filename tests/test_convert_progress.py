"""Convert's progress (issue 14 item 4): cases done / total and rejections so far; whole lines in
logs (no redraws), one redrawn line on a terminal."""

import io
import os
import re

from tfseg.convert import samples
from tfseg.convert.pipeline import run_convert
from tfseg.convert.transforms import REJECTED, ConvertProgress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_count_cases_and_rejections():
    out, clock = io.StringIO(), Clock()
    bar = ConvertProgress(40, out, clock=clock)
    for i in range(40):
        clock.t += 0.25
        bar.case_done(REJECTED if i in (3, 17) else "ok")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert len(lines) == 20  # every twentieth of the cases (2), the last at 40/40
    assert lines[0].startswith("converting: 2/40 cases (0 rejected), 4.00 cases/s")
    assert lines[1].startswith("converting: 4/40 cases (1 rejected)")
    assert lines[-1].startswith("converting: 40/40 cases (2 rejected), 4.00 cases/s") and "in all" in lines[-1]


def test_terminal_redraws_one_line():
    out, clock = io.StringIO(), Clock()
    bar = ConvertProgress(3, out, clock=clock, tty=True)
    for _ in range(3):
        clock.t += 1.0
        bar.case_done("ok")
    bar.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 4 and text.endswith("in all\n") and text.count("\n") == 1


def test_run_convert_reports_progress(tmp_path):

    raw = str(tmp_path / "raw")
    samples.write("carvana", raw, 8, seed=2, image_size=(16, 24))
    broken = sorted(os.listdir(os.path.join(raw, "train")))[0]
    with open(os.path.join(raw, "train", broken), "wb") as f:
        f.write(b"not a jpeg")
    out = io.StringIO()
    summary = run_convert("carvana", raw, str(tmp_path / "data"), progress_stream=out)
    assert summary["rejected"] == 1
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # Per-case lines come from the DoFn in this process (the default in_memory DirectRunner).
    counts = [int(re.match(r"converting: (\d+)/8 cases", line).group(1)) for line in lines]
    assert counts == sorted(counts) and len(counts) >= 8 and counts[-1] == 8
    assert lines[-1].startswith("converting: 8/8 cases (1 rejected)") and "in all" in lines[-1]
