"""What a run prints (issue 19, item 17): a stop's message on its own line with no progress bar redrawn after it,
and how many files `cxrgen status` checked."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import run_args
from typer.testing import CliRunner

from cxrgen.cli import app

# The real entry point, with the progress bar on; the engine sends SIGINT to its own process during the second
# batch, as a Ctrl-C would (the loop finishes the batch, then stops).
CTRL_C = textwrap.dedent("""
    import os, signal, sys
    from cxrgen.model.engine import Engine

    original, calls = Engine.run_batch, []

    def run_batch(self, items, on_step=None):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, items, on_step)

    Engine.run_batch = run_batch
    sys.argv = ["cxrgen", *sys.argv[1:]]
    from cxrgen.cli import main
    main()
""")


def test_the_stop_message_has_its_own_line_and_the_bar_is_not_redrawn_after_it(tmp_path, bundle_dir,
                                                                               text_encoder_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,num_images\nbig heart,3\nclear chest,3\n")
    out = tmp_path / "out"
    args = [a for a in map(str, run_args(manifest, bundle_dir, text_encoder_dir, tmp_path, "-o", out,
                                         "--batch-size", "2", "--device", "cpu")) if a != "--quiet"]
    done = subprocess.run([sys.executable, "-c", CTRL_C, *args[:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr
    stderr = done.stderr
    message = "cxrgen: error: stopped by SIGINT"
    start = stderr.index(message)
    assert "img/s]" in stderr[:start] or "img]" in stderr[:start]  # the bar was drawn before the stop
    assert stderr[:start].endswith("\n")  # the message starts a line of its own, not the bar's line
    after = stderr[start:]
    assert after.count("\n") == 1 and after.endswith("\n") and "\r" not in after  # nothing drawn after it
    assert "cxrgen resume" in after


def test_status_says_how_many_files_it_checked_and_how(tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,num_images\nbig heart,2\nclear chest,1\n")
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, [str(a) for a in run_args(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                        "-o", out)]).exit_code == 0
    quick = runner.invoke(app, ["status", str(out)])
    deep = runner.invoke(app, ["status", str(out), "--verify"])
    assert quick.exit_code == deep.exit_code == 0
    assert "checked:   3 recorded file(s), size only (--verify re-reads and decodes)" in quick.stdout.splitlines()
    assert "checked:   3 recorded file(s), each re-read, checksummed and decoded" in deep.stdout.splitlines()
    assert quick.stdout != deep.stdout
    assert "DEMO" not in quick.stdout  # a real (here: test) bundle is not called the demo
