"""The main job (`python -m attrprims demo`) runs end to end on the bundled digits and shows real preservation."""

import pytest

from attrprims.__main__ import main
from attrprims.demo import run


def test_demo_projects_real_gradients(capsys):
    rows = run(ks=(32, 2048), examples=200, epochs=2)
    assert {(r["kind"], r["k"]) for r in rows} == {(kind, k) for kind in ("rademacher", "gaussian", "sjlt", "factored") for k in (32, 2048)}
    for r in rows:
        if r["k"] == 2048 and r["kind"] != "factored":  # at large k gradient geometry survives
            assert r["dot_corr"] > 0.99 and r["nn_recall"] > 0.8 and r["dist_med"] < 0.1
        if r["k"] == 2048 and r["kind"] == "factored":  # Kronecker rows are correlated: less, but most of it
            assert r["dot_corr"] > 0.97 and r["nn_recall"] > 0.8 and r["dist_med"] < 0.2
    out = capsys.readouterr().out
    assert "digits: 1797 images" in out and "max |diff|" in out


def test_cli_info_and_bad_command(capsys):
    main(["info"])
    assert '"cpu_kernels"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])
