"""Errors of the run's environment end in the product's voice: the file, what to do, exit 2 (130 for Ctrl-C)."""

import errno
import subprocess
import sys

import pytest

from monai_mlbseg.utils import INPUT_ERROR_STATUS
from monai_mlbseg.utils.errors import INTERRUPTED_STATUS, environment_problem
from monai_mlbseg.utils.io import writing


def _wrapped(error):
    """``error`` as MONAI's config parser hands it on: the cause of a ``RuntimeError``."""
    try:
        try:
            raise error
        except BaseException as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as outer:
        return outer


def test_full_disk_unwritable_folder_and_ctrl_c_are_recognised_along_the_chain():
    message, status = environment_problem(_wrapped(OSError(errno.ENOSPC, "No space left on device", "w/s2/c.pt")))
    assert status == INPUT_ERROR_STATUS and message.startswith("w/s2/c.pt: no space left") and "same command" in message
    message, status = environment_problem(_wrapped(OSError(errno.EROFS, "Read-only file system", "w/model.pt")))
    assert status == INPUT_ERROR_STATUS and "w/model.pt: cannot be written (Read-only file system)" in message
    message, status = environment_problem(_wrapped(KeyboardInterrupt()))
    assert status == INTERRUPTED_STATUS and "interrupted" in message
    assert environment_problem(_wrapped(OSError(errno.ENOENT, "No such file", "x"))) is None
    assert environment_problem(ValueError("a bug")) is None


def test_a_torch_stream_error_on_a_full_device_names_the_file(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError) as raised, writing(tmp_path / "model.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:664] PytorchStreamWriter failed writing file data/0")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "model.pt")
    with pytest.raises(OSError) as raised, writing(tmp_path / "x.pt"):
        raise OSError(errno.EIO, "Input/output error")
    assert raised.value.filename == str(tmp_path / "x.pt"), "a write error without a file name gets the target's"


@pytest.mark.parametrize(
    "raise_, status, said",
    [
        (
            "raise RuntimeError('Failed') from OSError(28, 'No space left on device', '/w/stage2/c.pt')",
            2,
            "/w/stage2/c.pt: no space",
        ),
        ("raise KeyboardInterrupt", 130, "interrupted (Ctrl-C)"),
    ],
)
def test_the_command_line_ends_with_a_message_and_no_traceback(raise_, status, said):
    code = f"from monai_mlbseg.utils import exit_on_input_error; exit_on_input_error(); {raise_}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status and said in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_sigterm_stops_with_a_message_and_status_2():
    import signal
    import time

    code = (
        "import time; from monai_mlbseg.utils import exit_on_input_error; exit_on_input_error(); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == INPUT_ERROR_STATUS and "stopped (SIGTERM)" in out + err and "Traceback" not in err
    assert time.perf_counter() - start < 30, "at once"
