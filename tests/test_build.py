"""The build: _cuda exists where CI expects it, build_info / cuda_available describe what was built, the README runs."""

import os
import re
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
    assert info["cxx_compiler"] and info["cpu_kernels"] in {"avx2+fma", "generic"}
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
