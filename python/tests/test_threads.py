"""torch's OpenMP spin-waiting and svft's threads (svft/__init__.py): `import svft` before torch
sets OMP_WAIT_POLICY=PASSIVE (a user's own setting wins), and a CPU step taken while torch's
threads may spin warns once, saying what to do. Each case runs in a fresh interpreter, since the
policy is read when torch loads."""

import os
import subprocess
import sys


def run(code, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


STEP = ("import torch; from svft.nn import SVFTLinear; torch.set_num_threads(2); "
        "m = SVFTLinear.from_linear(torch.nn.Linear(16, 12), pattern='banded:1'); m(torch.randn(5, 16)).sum().backward()")


def test_import_before_torch_makes_openmp_passive():
    out = run("import os, svft, torch; print(os.environ['OMP_WAIT_POLICY'])", {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
    out = run("import os, svft, torch; print(os.environ['OMP_WAIT_POLICY'])", {"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE", "a user's own policy is kept"
    out = run("import svft; " + STEP, {})
    assert out.returncode == 0 and "spin-wait" not in out.stderr, out.stderr


def test_torch_first_warns_once_on_a_cpu_step():
    out = run("import torch; " + STEP + "; m(torch.randn(5, 16)).sum().backward()", {})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("OMP_WAIT_POLICY=PASSIVE") == 1, out.stderr
