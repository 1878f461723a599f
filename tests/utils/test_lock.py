"""One run per folder: a second process is refused at once, naming the folder and the holder; a kill frees it."""

import signal
import subprocess
import sys
import time

import pytest

from monai_mlbseg.utils import LOCK_FILE, InputError, lock_folder, release_folder

HOLD = (
    "import sys, time; from monai_mlbseg.utils import lock_folder; "
    "lock_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)"
)


def test_a_second_process_is_refused_and_a_killed_holder_frees_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError) as refused:
            lock_folder(tmp_path)
        message = str(refused.value)
        assert str(tmp_path) in message and f"process {holder.pid}" in message and "-c" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).is_file(), "the lock file stays behind"
    start = time.perf_counter()
    assert lock_folder(tmp_path) == tmp_path.resolve(), "and does not block: the kill released the lock"
    assert time.perf_counter() - start < 5
    assert lock_folder(tmp_path) == tmp_path.resolve(), "the holder may take it again"
    release_folder(tmp_path)
    release_folder(tmp_path)  # releasing twice is harmless
