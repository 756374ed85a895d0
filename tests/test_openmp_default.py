"""tunesmith sets libgomp's spin count before torch loads, so a second process on the cores costs ~2x, not 11x
(bench/cpu_sharing.py); a user's own setting wins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "import os, tunesmith, torch; print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize("given, expected", [(None, "1000"), ("300000", "300000")])
def test_spin_count_default_and_user_setting(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_cli_sets_it_before_torch_loads():
    """The console script imports the package (and so sets the variable) before anything imports torch."""
    code = ("import os, sys; os.environ.pop('GOMP_SPINCOUNT', None); import tunesmith.cli; "
            "assert 'torch' not in sys.modules or os.environ['GOMP_SPINCOUNT'] == '1000'; "
            "print(os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000"
