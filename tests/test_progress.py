"""Progress lines for evaluate and predict: plain lines in logs, one redrawn line on a terminal."""

import io

from tfseg.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_lines_every_n_items_with_rate_and_no_redraws():
    out, clock = io.StringIO(), Clock()
    with Progress(100, "predicting", unit="images", stream=out, clock=clock) as bar:
        clock.t = 10.0  # model loading: not part of the rate
        bar.update(1)
        for _ in range(99):
            clock.t += 0.5
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and "\033" not in text
    lines = text.splitlines()
    assert len(lines) == 20  # a line every 5 images (a twentieth), the last one at 100/100
    assert lines[0].startswith("predicting: 5/100 images, 2.00 images/s")  # 4 images in 2 s
    assert "s left" in lines[0]
    assert lines[-1].startswith("predicting: 100/100 images, 2.00 images/s") and "in all" in lines[-1]


def test_log_line_after_interval_and_final_line_for_partial_counts():
    out, clock = io.StringIO(), Clock()
    bar = Progress(1000, "evaluating test", stream=out, clock=clock, interval=30.0, every=1)
    bar.update(1)  # the first line: no rate yet (it would count the model loading)
    bar.every = 50
    clock.t = 31.0
    bar.update(1)  # 2 < 50 items, but 31 s since the last line
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluating test: 1/1000 images"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["evaluating test: 2/1000 images", "evaluating test: 3/1000 images"]
    assert lines[2].startswith("evaluating test: 3/1000 images, 0.06 images/s")  # 2 images in 31 s


def test_terminal_redraws_one_line():
    out, clock = io.StringIO(), Clock()
    with Progress(3, "predicting", stream=out, tty=True, clock=clock) as bar:
        for _ in range(3):
            clock.t += 1.0
            bar.update(1)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and "\r\033[K" in text
    assert "3/3 images" in text.splitlines()[-1]
