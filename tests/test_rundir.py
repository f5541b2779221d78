"""Run directories: plain names, writable places, one command at a time, no empty leftovers."""

import os
from pathlib import Path

import pytest

from tailaug.engine.rundir import check_run_name, open_run_dir, run_dir_path
from tailaug.errors import TailaugError


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "/tmp/abs", "a/b", ".hidden", "-x", "a b",
                                  "a\x00b", "x" * 101, "x" * 300, "tab\tname"])
def test_a_name_that_is_not_a_plain_directory_name_is_refused(name):
    with pytest.raises(TailaugError, match="is not a plain directory name") as info:
        check_run_name(name)
    assert "\n" not in str(info.value) and "run.name" in str(info.value)


@pytest.mark.parametrize("name", ["fmnist_lt_demo", "ce-s0", "a.b+c=d,e@f", "x" * 100, "0"])
def test_plain_names_are_accepted(name):
    assert run_dir_path("runs", name) == Path("runs") / name


def test_the_lock_records_its_process_and_refuses_a_second_holder(tmp_path):
    run = tmp_path / "out" / "run"
    with open_run_dir(run, create=True):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(TailaugError, match=f"in use by another tailaug command \\(process {os.getpid()}\\)"):
            with open_run_dir(run, create=True):
                pass
    with open_run_dir(run, create=False):  # released
        pass


def test_a_failed_command_removes_only_the_directory_it_created_empty(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with open_run_dir(new, create=True):
            raise RuntimeError
    assert not new.exists()

    with pytest.raises(KeyboardInterrupt):
        with open_run_dir(new, create=True):
            (new / "config.yaml").write_text("kept")
            raise KeyboardInterrupt
    assert (new / "config.yaml").read_text() == "kept"

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with open_run_dir(existing, create=True):
            raise RuntimeError
    assert existing.is_dir()


def test_a_file_or_an_unwritable_place_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TailaugError, match="exists and is not a directory"):
        with open_run_dir(tmp_path / "file", create=True):
            pass
    with pytest.raises(TailaugError, match="cannot create the run directory .*run.output_dir"):
        with open_run_dir(tmp_path / "file" / "run", create=True):
            pass
    with pytest.raises(TailaugError, match="cannot (create|write in) the run directory"):
        with open_run_dir("/proc/tailaug-test/run", create=True):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_a_run_dir_held_by_another_process_is_refused(tmp_path):
    """Two real processes: the second command fails at once and names the first one's pid."""
    import subprocess
    import sys

    import pytest

    from tailaug.engine.rundir import open_run_dir
    from tailaug.errors import TailaugError

    run_dir = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom tailaug.engine.rundir import open_run_dir\n"
         f"with open_run_dir({str(run_dir)!r}, create=True):\n    print('held', flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TailaugError, match=f"in use by another tailaug command \\(process {holder.pid}\\)"):
            with open_run_dir(run_dir, create=True):
                pass
    finally:
        holder.communicate("", timeout=30)
    with open_run_dir(run_dir, create=True):  # released when the holder ended
        pass
