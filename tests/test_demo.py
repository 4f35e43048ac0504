"""The main job (`python -m attrprims demo`) runs end to end on the bundled digits: TRAK, the PNG, a real LDS."""

import pytest

from attrprims.__main__ import main
from attrprims.demo import run


def test_demo_attributes_digits(tmp_path, capsys):
    result = run(models=2, proj_dim=256, subsets=20, out=tmp_path / "grid.png", progress=False)
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert result["accuracy"] > 0.9
    assert result["lds"] > 0.3 and result["lds_low"] <= result["lds"] <= result["lds_high"]
    assert result["same_label_helpful"] >= 0.35  # far above chance (0.1): helpful images share the label
    out = capsys.readouterr().out
    assert "LDS over 20 models" in out and "wrote" in out


def test_cli_info_and_bad_command(capsys):
    main(["info"])
    assert '"cpu_kernels"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])
