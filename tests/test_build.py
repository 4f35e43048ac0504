"""The build: _cuda exists where CI expects it, build_info / cuda_available describe what was built, the README runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attrprims


@pytest.mark.skipif(os.environ.get("ATTRPRIMS_EXPECT_CUDA") != "1", reason="ATTRPRIMS_EXPECT_CUDA=1 not set (no nvcc in CI)")
def test_cuda_module_was_built():
    from attrprims import _cuda  # noqa: F401  (an ImportError here fails the test with the loader's message)

    info = attrprims.build_info()
    assert info["cuda"] is True
    assert "80" in info["cuda_archs"] and "90" in info["cuda_archs"]


def test_build_info_describes_the_build():
    info = attrprims.build_info()
    assert info["version"] == attrprims.__version__
    assert info["cxx_compiler"] and info["cpu_kernels"] == info["cpu_kernels_supported"][-1]
    assert info["cpu_kernels_supported"][0] == "generic"
    assert set(info["cpu_kernels_supported"]) <= {"generic", "avx2", "avx512"}
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_available"], str)
    if sys.platform.startswith("linux"):  # torch's CPU wheels bring libgomp: the kernels share its threads
        assert info["cpu_threads"] == "openmp team"


def test_cuda_available_gives_a_reason():
    status = attrprims.cuda_available()
    assert isinstance(status.available, bool) and bool(status) == status.available
    assert status.reason


def test_readme_quickstart_runs():
    """The README's quickstart is executed as written, so it stays true."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md quickstart", "exec"), {})


def test_cpu_kernels_can_be_chosen():
    supported = attrprims.build_info()["cpu_kernels_supported"]
    best = supported[-1]
    try:
        assert attrprims.set_cpu_kernels("generic") == best
        assert attrprims.build_info()["cpu_kernels"] == "generic"
    finally:
        attrprims.set_cpu_kernels(best)
    assert attrprims.build_info()["cpu_kernels"] == best
    with pytest.raises(ValueError, match="isa: expected one of"):
        attrprims.set_cpu_kernels("sse9")
    with pytest.raises(TypeError, match="isa: expected a string"):
        attrprims.set_cpu_kernels(2)


def test_cpu_kernels_from_the_environment():
    code = "import attrprims; print(attrprims.build_info()['cpu_kernels'])"
    env = {**os.environ, "ATTRPRIMS_CPU_KERNELS": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"
    env["ATTRPRIMS_CPU_KERNELS"] = "sse9"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "ATTRPRIMS_CPU_KERNELS: isa: expected one of" in failed.stderr
