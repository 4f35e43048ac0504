"""Retraining harness: subset masks, derived seeds, outputs, the cache (reuse, separate entries, resume), errors."""

import hashlib
import io
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrprims.metrics import lds, retrain_outputs, subset_masks, subset_seed

N, D, M = 40, 5, 7  # training examples, features, targets


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(D, generator=g, dtype=torch.float64), torch.randn(M, D, generator=g, dtype=torch.float64)


class Ridge:
    """train_fn: ridge regression on the subset plus seeded noise (so the seed matters); records its calls."""

    def __init__(self, fail_on_call=None):
        self.x, self.y, self.targets = _data()
        self.calls, self.fail_on_call = [], fail_on_call

    def __call__(self, indices, seed):
        self.calls.append((indices.clone(), seed))
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        x, y = self.x[indices], self.y[indices]
        w = torch.linalg.solve(x.T @ x + 0.1 * torch.eye(D, dtype=torch.float64), x.T @ y)
        return w + 1e-3 * torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def outputs(self, w):
        return self.targets @ w


def _entries(cache):
    return sorted(name for name in os.listdir(cache) if name.startswith("retrain-"))


@pytest.mark.parametrize("n, s, alpha, size", [(10, 3, 0.5, 5), (5, 4, 0.5, 2), (7, 2, 1.0, 7), (1, 1, 1, 1),
                                               (1000, 3, 0.3, 300), (9, 5, 0.01 + 1 / 9, 1)])
def test_subset_masks_have_round_alpha_n_per_row(n, s, alpha, size):
    masks = subset_masks(n, s, alpha, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (s, n) and masks.device.type == "cpu"
    assert masks.sum(1).tolist() == [size] * s  # round half to even: round(2.5) == 2


def test_subset_masks_are_seeded_and_extend():
    a = subset_masks(100, 20, 0.5, seed=1)
    assert torch.equal(a, subset_masks(100, 20, 0.5, seed=1))
    assert not torch.equal(a, subset_masks(100, 20, 0.5, seed=2))
    assert torch.equal(a[:5], subset_masks(100, 5, 0.5, seed=1))  # more subsets extend the same experiment
    assert len({tuple(row.tolist()) for row in a}) == 20
    # Every example is drawn about alpha of the time.
    frequency = subset_masks(50, 2000, 0.3, seed=4).double().mean(0)
    assert frequency.sub(0.3).abs().max() < 0.05


@pytest.mark.parametrize("args, error, match", [
    ((10, 3, 0.0), ValueError, r"alpha: expected a fraction in \(0, 1\], got 0.0"),
    ((10, 3, 1.5), ValueError, "alpha: expected a fraction"),
    ((10, 3, -0.5), ValueError, "alpha"),
    ((10, 3, True), ValueError, "alpha"),
    ((10, 3, "0.5"), ValueError, "alpha"),
    ((10, 3, 0.01), ValueError, r"alpha: expected round\(alpha · n_train\) >= 1"),
    ((10, 0, 0.5), ValueError, "n_subsets: expected an integer >= 1, got 0"),
    ((0, 3, 0.5), ValueError, "n_train: expected an integer >= 1, got 0"),
    ((10.0, 3, 0.5), TypeError, "n_train: expected an integer"),
    ((10, 3, 0.5, -1), ValueError, "seed"),
])
def test_subset_masks_errors_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        subset_masks(*args)


def test_subset_seed_is_a_fixed_hash():
    seeds = {subset_seed(seed, j) for seed in range(5) for j in range(50)}
    assert len(seeds) == 250 and all(0 <= v < 2**63 for v in seeds)
    digest = hashlib.sha256(b"attrprims.retrain" + (7).to_bytes(8, "little") + (3).to_bytes(8, "little")).digest()
    assert subset_seed(7, 3) == int.from_bytes(digest[:8], "little") >> 1
    torch.manual_seed(subset_seed(2**64 - 1, 2**64 - 1))
    with pytest.raises(ValueError, match="index"):
        subset_seed(0, -1)


def test_outputs_match_a_plain_loop():
    masks = subset_masks(N, 6, 0.5, seed=0)
    ridge = Ridge()
    out = retrain_outputs(ridge, ridge.outputs, masks, seed=11, progress=False)
    assert out.dtype == torch.float64 and out.shape == (6, M)
    plain = Ridge()
    expected = torch.stack([plain.outputs(plain(masks[j].nonzero().flatten(), subset_seed(11, j))) for j in range(6)])
    assert torch.equal(out, expected)
    for j, (indices, seed) in enumerate(ridge.calls):
        assert indices.dtype == torch.int64 and torch.equal(indices, masks[j].nonzero().flatten())
        assert seed == subset_seed(11, j)
    other_seed = retrain_outputs(Ridge(), ridge.outputs, masks, seed=12, progress=False)
    assert not torch.equal(out, other_seed)


@pytest.mark.parametrize("convert", [lambda t: t.tolist(), lambda t: t.numpy(), lambda t: t.float(),
                                     lambda t: t.requires_grad_(True) * 1])
def test_output_fn_may_return_lists_arrays_and_tensors(convert):
    masks = subset_masks(N, 3, 0.5)
    ridge = Ridge()
    out = retrain_outputs(ridge, lambda w: convert(ridge.outputs(w)), masks, progress=False)
    expected = retrain_outputs(Ridge(), ridge.outputs, masks, progress=False)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float64 and not out.requires_grad


def test_cache_reuses_every_subset(tmp_path):
    masks = subset_masks(N, 5, 0.5)
    first = Ridge()
    out = retrain_outputs(first, first.outputs, masks, cache=tmp_path, key="ridge-v1", progress=False)
    again = Ridge()
    assert torch.equal(retrain_outputs(again, again.outputs, masks, cache=tmp_path, key="ridge-v1", progress=False),
                       out)
    assert len(first.calls) == 5 and again.calls == []
    (entry,) = _entries(tmp_path)
    with open(tmp_path / entry / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["key"] == "ridge-v1" and manifest["seed"] == 0 and manifest["n_targets"] == M
    assert manifest["n_subsets"] == 5 and manifest["n_train"] == N and len(manifest["masks_sha256"]) == 64
    assert sorted(os.listdir(tmp_path / entry)) == ["manifest.json"] + [f"subset-{j:06d}.npy" for j in range(5)]
    assert np.array_equal(np.load(tmp_path / entry / "subset-000003.npy"), out[3].numpy())


def test_another_key_seed_or_masks_is_another_entry(tmp_path):
    masks = subset_masks(N, 3, 0.5)
    runs = [(masks, "a", 0), (masks, "b", 0), (masks, {"model": "ridge", "lr": 0.1}, 0), (masks, "a", 1),
            (subset_masks(N, 3, 0.5, seed=1), "a", 0), (masks[:2], "a", 0)]
    for i, (m, key, seed) in enumerate(runs):
        ridge = Ridge()
        retrain_outputs(ridge, ridge.outputs, m, cache=tmp_path, key=key, seed=seed, progress=False)
        assert len(ridge.calls) == m.shape[0]
        assert len(_entries(tmp_path)) == i + 1
    ridge = Ridge()  # dict keys are compared as JSON: their order does not matter
    retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key={"lr": 0.1, "model": "ridge"}, progress=False)
    assert ridge.calls == []


@pytest.mark.parametrize("fail_on_call", [1, 3, 6])
def test_interrupted_run_resumes_with_the_missing_subsets(tmp_path, fail_on_call):
    masks = subset_masks(N, 6, 0.5, seed=5)
    uninterrupted = Ridge()
    expected = retrain_outputs(uninterrupted, uninterrupted.outputs, masks, seed=2, progress=False)
    crashing = Ridge(fail_on_call=fail_on_call)
    with pytest.raises(KeyboardInterrupt):
        retrain_outputs(crashing, crashing.outputs, masks, seed=2, cache=tmp_path, key="k", progress=False)
    (entry,) = _entries(tmp_path)
    done = fail_on_call - 1
    assert sorted(os.listdir(tmp_path / entry)) == ["manifest.json"] + [f"subset-{j:06d}.npy" for j in range(done)]
    resumed = Ridge()
    out = retrain_outputs(resumed, resumed.outputs, masks, seed=2, cache=tmp_path, key="k", progress=False)
    assert [seed for _, seed in resumed.calls] == [subset_seed(2, j) for j in range(done, 6)]
    assert torch.equal(out, expected)


@given(st.lists(st.integers(1, 5), max_size=4), st.integers(0, 2**32 - 1))
def test_resume_after_any_interruptions_equals_uninterrupted(failures, seed):
    masks = subset_masks(N, 5, 0.4, seed=seed)
    ridge = Ridge()
    expected = retrain_outputs(ridge, ridge.outputs, masks, seed=seed, progress=False)
    with tempfile.TemporaryDirectory() as cache:
        trained = 0
        for fail_on_call in failures:
            run = Ridge(fail_on_call=fail_on_call)
            try:
                retrain_outputs(run, run.outputs, masks, seed=seed, cache=cache, key="k", progress=False)
            except KeyboardInterrupt:
                trained -= 1
            trained += len(run.calls)
        last = Ridge()
        assert torch.equal(retrain_outputs(last, last.outputs, masks, seed=seed, cache=cache, key="k",
                                           progress=False), expected)
        assert trained + len(last.calls) == 5  # no subset trained twice to completion


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    masks = subset_masks(N, 3, 0.5)
    real_save, saves = np.save, []

    def failing_save(file, array):
        saves.append(1)
        if len(saves) == 2:
            file.write(b"partial")
            raise OSError("disk full")
        real_save(file, array)

    monkeypatch.setattr(np, "save", failing_save)
    ridge = Ridge()
    with pytest.raises(OSError, match="disk full"):
        retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key="k", progress=False)
    monkeypatch.setattr(np, "save", real_save)
    (entry,) = _entries(tmp_path)
    assert sorted(os.listdir(tmp_path / entry)) == ["manifest.json", "subset-000000.npy"]
    again = Ridge()
    retrain_outputs(again, again.outputs, masks, cache=tmp_path, key="k", progress=False)
    assert len(again.calls) == 2


def test_foreign_or_corrupt_entry_is_refused(tmp_path):
    masks = subset_masks(N, 2, 0.5)
    ridge = Ridge()
    retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key="k", progress=False)
    (entry,) = _entries(tmp_path)
    np.save(tmp_path / entry / "subset-000001.npy", np.zeros(M + 1))
    with pytest.raises(ValueError, match=r"cache: expected .*subset-000001.npy to hold \[7\] float64, got \[8\]"):
        retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key="k", progress=False)
    manifest_path = tmp_path / entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "key": "other"}))
    with pytest.raises(ValueError, match="cache: expected .*manifest.json to describe this experiment"):
        retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key="k", progress=False)


def test_end_to_end_lds_of_an_exactly_linear_model():
    """A model that averages its subset's features is exactly linear in the mask (fixed |S| = k): LDS 1."""
    x, _, _ = _data()
    masks = subset_masks(N, 30, 0.5, seed=9)
    outputs = retrain_outputs(lambda indices, seed: x[indices].mean(0), lambda model: model, masks, progress=False)
    scores = x.T / round(0.5 * N)  # [D targets, N]: example i adds x[i, t] / k to target t's output
    result = lds(scores, masks, outputs)
    torch.testing.assert_close(result.per_target, torch.ones(D, dtype=torch.float64), rtol=0, atol=1e-12)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_only_when_asked_and_on_a_terminal(monkeypatch, progress):
    pytest.importorskip("tqdm")
    ridge, terminal, pipe = Ridge(), _Terminal(), io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    retrain_outputs(ridge, ridge.outputs, subset_masks(N, 6, 0.5), progress=progress)
    assert ("retrain:" in terminal.getvalue()) == progress and (terminal.getvalue() == "") != progress
    monkeypatch.setattr("sys.stderr", pipe)  # not a terminal: silent even when asked
    retrain_outputs(ridge, ridge.outputs, subset_masks(N, 6, 0.5), progress=True)
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("change, error, match", [
    ({"masks": subset_masks(N, 2, 0.5).int()}, ValueError, "masks: expected dtype bool"),
    ({"masks": torch.ones(N, dtype=torch.bool)}, ValueError, r"masks: expected shape \[s, n\]"),
    ({"masks": torch.ones(0, N, dtype=torch.bool)}, ValueError, "masks: expected at least one subset"),
    ({"output_fn": lambda w: torch.ones(2, 2)}, ValueError, r"output_fn: expected shape \[m\], got \[2, 2\]"),
    ({"output_fn": lambda w: 1.0}, ValueError, r"output_fn: expected shape \[m\], got \[\]"),
    ({"output_fn": lambda w: "x"}, TypeError, "output_fn: expected a 1-D tensor"),
    ({"output_fn": lambda w: [float("nan")] * M}, ValueError, "output_fn: expected finite outputs"),
    ({"key": "k"}, ValueError, "key: only used with cache="),
    ({"cache": "CACHE"}, ValueError, "key: expected a string or JSON data naming the experiment"),
    ({"cache": "CACHE", "key": object()}, TypeError, "key: expected a string or JSON data"),
    ({"cache": "CACHE", "key": float("nan")}, TypeError, "key: expected a string or JSON data"),
    ({"progress": 1}, TypeError, "progress: expected True or False"),
    ({"seed": 2**64}, ValueError, "seed"),
])
def test_errors_name_the_argument(tmp_path, change, error, match):
    ridge = Ridge()
    kwargs = {"train_fn": ridge, "output_fn": ridge.outputs, "masks": subset_masks(N, 2, 0.5), "progress": False,
              **change}
    if kwargs.get("cache") == "CACHE":
        kwargs["cache"] = tmp_path
    with pytest.raises(error, match=match):
        retrain_outputs(**kwargs)


def test_output_length_must_not_change_between_subsets(tmp_path):
    ridge, lengths = Ridge(), iter([M, M - 1])
    with pytest.raises(ValueError, match=rf"output_fn: expected shape \[m\] with m == {M} .*got \[{M - 1}\] "
                                         r"\(subset 1\)"):
        retrain_outputs(ridge, lambda w: ridge.outputs(w)[:next(lengths)], subset_masks(N, 2, 0.5), progress=False)
    masks = subset_masks(N, 2, 0.5)  # a cached entry pins m too
    ridge = Ridge(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        retrain_outputs(ridge, ridge.outputs, masks, cache=tmp_path, key="k", progress=False)
    with pytest.raises(ValueError, match=rf"m == {M} .*\(subset 1\)"):
        retrain_outputs(Ridge(), lambda w: ridge.outputs(w)[:3], masks, cache=tmp_path, key="k", progress=False)
