"""jemalloc preloaded by a restart of the command-line entry points (src/tunesmith/allocator.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunesmith.allocator import CHOICE, find_allocator, preload_env
from tunesmith.errors import TunesmithError


def _touch(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"")
    return folder / name


def test_jemalloc_is_preferred_over_tcmalloc(tmp_path):
    tc = _touch(tmp_path / "a", "libtcmalloc_minimal.so.4")
    je = _touch(tmp_path / "b", "libjemalloc.so.2")
    assert find_allocator([tmp_path / "a", tmp_path / "b"]) == je
    assert find_allocator([tmp_path / "a"]) == tc
    assert find_allocator([tmp_path / "none"]) is None


def test_preload_env_adds_the_library_once_and_keeps_a_users_preload(tmp_path):
    lib = _touch(tmp_path, "libmine.so")
    env = preload_env({CHOICE: str(lib), "LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"/opt/other.so {lib}"
    assert preload_env(env) is None  # already there: no second restart


def test_system_choice_keeps_glibc():
    assert preload_env({CHOICE: "system"}) is None


def test_a_missing_library_is_one_clear_error(tmp_path):
    with pytest.raises(TunesmithError, match=rf"{CHOICE}=.*no such file; set it to auto, system"):
        preload_env({CHOICE: str(tmp_path / "missing.so")})


@pytest.mark.skipif(find_allocator() is None, reason="no jemalloc or tcmalloc on this machine")
def test_the_restart_really_loads_the_allocator(tmp_path):
    """The entry point's restart runs the module again with the library mapped into the new process."""
    (tmp_path / "probe.py").write_text(
        "import os\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('LOADED' if os.path.basename(os.environ['PROBE_LIB']) in maps else 'MISSING')\n"
    )
    launcher = "from tunesmith.allocator import restart_with_allocator; restart_with_allocator('probe')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "PROBE_LIB": str(find_allocator())}
    env.pop("LD_PRELOAD", None)
    env.pop(CHOICE, None)
    out = subprocess.run([sys.executable, "-c", launcher], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "LOADED", out.stderr
    env[CHOICE] = "system"
    out = subprocess.run([sys.executable, "-c", launcher], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "", out.stderr  # no restart: the launcher itself prints nothing


def test_cli_entry_point_reports_a_bad_choice_in_one_line(tmp_path):
    env = {**os.environ, CHOICE: str(tmp_path / "missing.so")}
    out = subprocess.run([sys.executable, "-m", "tunesmith", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {CHOICE}={tmp_path / 'missing.so'}: no such file; set it to "
                                               "auto, system, or the path of a malloc library such as "
                                               "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"]


OVERSIZE_LOOP = r"""
import resource, sys, torch
from tunesmith.allocator import keep_oversize_pages
x = torch.ones(4096, 2048, dtype=torch.int16)  # 16 MiB: above jemalloc's 8 MiB oversize threshold
def faults():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x & x
        del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(keep_oversize_pages(2**20), faults(), keep_oversize_pages(2**30), faults())
"""


def test_oversize_pages_are_kept_under_jemalloc_and_nothing_changes_without_it():
    """Under jemalloc each 16 MiB tensor faults its 4096 pages in anew until the oversize arena keeps freed pages
    (asked for by a run whose largest tensor is oversize; one whose tensors are all smaller changes nothing);
    then the same allocation faults (almost) none. Without jemalloc the call reports False."""
    library = find_allocator()
    if library is None or "jemalloc" not in library.name:
        pytest.skip("jemalloc is not installed (make setup installs it as root)")
    env = {**os.environ, "LD_PRELOAD": str(library)}
    env.pop("MALLOC_CONF", None)
    out = subprocess.run([sys.executable, "-c", OVERSIZE_LOOP], env=env, capture_output=True, text=True, check=True)
    small, before, applied, after = out.stdout.split()
    assert small == "False" and int(before) >= 4000, out.stdout  # a run whose tensors are all small: unchanged
    assert applied == "True" and int(after) < 100, out.stdout
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", OVERSIZE_LOOP], env=plain, capture_output=True, text=True, check=True)
    assert out.stdout.split()[2] == "False", out.stdout
