"""Progress lines (pipeline/console.py): a total, a rate and an ETA; a record in a log rather than a flood."""
import io
import time

from pipeline.console import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_with_total_and_eta_every_interval_and_one_at_the_end():
    log = io.StringIO()
    progress = Progress("encode", 10, every=0.05, stream=log)
    progress.update(1, "1 done")
    progress.update(2)  # within the interval: no line
    time.sleep(0.06)
    progress.update(4, "4 done")
    progress.update(10, "10 done")
    progress.update(10, "10 done")  # the end is shown once
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first update fell within the interval from the start, too
    assert lines[0].startswith("encode: 4/10 images (40%), ") and "ETA " in lines[0] and lines[0].endswith("; 4 done")
    assert lines[1].startswith("encode: 10/10 images (100%), ") and "ETA" not in lines[1]


def test_a_terminal_line_is_redrawn_in_place_and_ended_once():
    screen = Terminal()
    progress = Progress("fit", 3, unit="epochs", stream=screen)
    progress.last -= 1  # as if the last redraw were long ago
    progress.update(1)
    progress.close()
    assert screen.getvalue().startswith("\r\033[Kfit: 1/3 epochs (33%)") and screen.getvalue().endswith("\n")
    assert screen.getvalue().count("\n") == 1
