"""Run a test script through Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
hence a subprocess), with the patch Triton 3.6's interpreter needs under numpy >= 2.4."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which numpy >= 2.4 refuses;
# convert through the single element instead (as later Triton releases do).
PATCH = textwrap.dedent("""
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import triton.runtime.interpreter as interpreter
    patch_tensor = interpreter._patch_lang_tensor
    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched
""")


def run_in_interpreter(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` (dedented) in a fresh Python with TRITON_INTERPRET=1, the repository and its tests on its path."""
    path = [str(ROOT), str(ROOT / "envs_tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-c", PATCH + textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_runs_in_interpreter(script: str) -> None:
    """Run ``script`` as :func:`run_in_interpreter` does; it must exit 0 and print "interpreter ok" (its last
    line, after its checks)."""
    result = run_in_interpreter(script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interpreter ok" in result.stdout
