"""attrprims.methods.TRAK: the published estimator against a float64 formula, top-k, self-scores, damping
sweeps, the feature store (resume gives the same scores), checkpoints as paths, errors."""

import pytest
import torch
from torch import nn

import reference
from attrprims import Projector, param_layout
from attrprims.methods import TRAK
from attrprims.methods.trak import AUTO_DAMPING
from attrprims.tasks import MultiClassClassification

TASK = MultiClassClassification()
ARGS = lambda example: ((example[0],), {})  # noqa: E731  (model arguments of a batch)


def setting(n=60, m=7, models=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n + m, 6, generator=g), torch.randint(0, 3, (n + m,), generator=g)
    nets = []
    for s in range(models):
        torch.manual_seed(s)
        nets.append(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
    train = [(x[i:min(i + 16, n)], y[i:min(i + 16, n)]) for i in range(0, n, 16)]
    return nets, train, [(x[n:], y[n:])]


def expected_scores(nets, train, test, k, seed, damping):
    """Park et al.'s estimator written out in float64 with the projection matrix materialised."""
    total, qs = 0, []
    for net in nets:
        names = param_layout(net).names
        P = Projector(param_layout(net).p, k, seed).matrix().double()
        phi = torch.cat([reference.per_sample_grads(net, TASK.output, b, names, ARGS) for b in train]) @ P
        phi_z = torch.cat([reference.per_sample_grads(net, TASK.output, b, names, ARGS) for b in test]) @ P
        g = phi.T @ phi
        lam = damping(g, phi.shape[0])
        total = total + phi_z @ torch.linalg.solve(g + lam * torch.eye(k, dtype=torch.float64), phi.T)
        with torch.no_grad():
            qs.append(torch.cat([TASK.out_to_loss(net(b[0]), b).double() for b in train]))
    return total / len(nets) * torch.stack(qs).mean(0)


@pytest.mark.parametrize("path", ["layer", "generic"])
def test_matches_the_published_estimator(path):
    nets, train, test = setting()
    trak = TRAK(nets[0], TASK, proj_dim=16, seed=3, path=path, progress=False)
    trak.featurize(train, [n.state_dict() for n in nets])
    auto = expected_scores(nets, train, test, 16, 3, lambda g, n: AUTO_DAMPING * torch.trace(g) / n)
    torch.testing.assert_close(trak.score(test).double(), auto, rtol=2e-4, atol=1e-5)
    relative = expected_scores(nets, train, test, 16, 3, lambda g, n: 0.1 * torch.trace(g) / 16)
    torch.testing.assert_close(trak.score(test, damping=0.1).double(), relative, rtol=2e-4, atol=1e-5)


def test_more_dimensions_than_training_examples():
    """k > n: the kernel is solved through the n×n ΦΦᵀ (FeatureGram), to the same scores."""
    nets, train, test = setting(n=20)
    trak = TRAK(nets[0], TASK, proj_dim=48, seed=2, progress=False).featurize(train, [n.state_dict() for n in nets])
    auto = expected_scores(nets, train, test, 48, 2, lambda g, n: AUTO_DAMPING * torch.trace(g) / n)
    torch.testing.assert_close(trak.score(test).double(), auto, rtol=2e-4, atol=1e-5)
    sweep = trak.score(test, damping=[0.1, 1.0])
    relative = expected_scores(nets, train, test, 48, 2, lambda g, n: 1.0 * torch.trace(g) / 48)
    torch.testing.assert_close(sweep[1].double(), relative, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(trak.self_score(), trak.score(train).diagonal(), rtol=1e-4, atol=1e-6)


def test_topk_self_score_and_sweep_agree_with_dense():
    nets, train, test = setting(models=3)
    trak = TRAK(nets[0], TASK, proj_dim=12, progress=False).featurize(train, [n.state_dict() for n in nets])
    dense = trak.score(test)
    assert dense.shape == (7, 60)
    ranked = trak.score(test, topk=4, bottomk=4)
    assert torch.equal(ranked.top_indices, dense.topk(4).indices)
    assert torch.equal(ranked.bottom_indices, dense.topk(4, largest=False).indices)
    torch.testing.assert_close(ranked.top_values, dense.topk(4).values, rtol=1e-4, atol=1e-6)
    sweep = trak.score(test, damping=[0.01, 1.0])
    assert sweep.shape == (2, 7, 60)
    torch.testing.assert_close(sweep[1], trak.score(test, damping=1.0))
    # Self-scores are the diagonal of the training set scored against itself.
    full = trak.score(train)
    torch.testing.assert_close(trak.self_score(), full.diagonal(), rtol=1e-4, atol=1e-6)


def test_store_resume_gives_identical_scores(tmp_path):
    nets, train, test = setting()
    states = [n.state_dict() for n in nets]
    plain = TRAK(nets[0], TASK, proj_dim=8, progress=False).featurize(train, states).score(test)

    def counted(trak, fail_after=None):
        calls, original = [], trak._features

        def project(task, batch):
            if fail_after is not None and len(calls) == fail_after:
                raise KeyboardInterrupt  # the run is interrupted here
            calls.append(len(batch[0]))
            return original(task, batch)

        trak._features = project
        return calls

    first = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False)
    counted(first, fail_after=3)  # batches go through every checkpoint in turn: batch 0 twice, then batch 1 once
    with pytest.raises(KeyboardInterrupt):
        first.featurize(train, states)
    again = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False)
    calls = counted(again)
    again.featurize(train, states)
    assert sum(calls) == (60 - 32) + (60 - 16)  # stored: batches 0-1 of model 0, batch 0 of model 1
    torch.testing.assert_close(again.score(test), plain, rtol=1e-5, atol=1e-7)
    changed = [{name: t + 0.01 for name, t in state.items()} for state in states]
    third = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False)
    calls = counted(third)
    third.featurize(train, changed)
    assert sum(calls) == 120  # other weights: nothing stored is reused
    with pytest.raises(ValueError, match="config.projector.seed"):
        TRAK(nets[0], TASK, proj_dim=8, seed=9, store=tmp_path / "s", progress=False).featurize(train, states)


def test_data_is_read_once_for_all_checkpoints(tmp_path):
    """One pass over the training and the test data whatever the number of checkpoints, with or without a store."""
    nets, train, test = setting(models=3)
    states = [n.state_dict() for n in nets]

    class Counted:
        def __init__(self, batches):
            self.batches, self.passes = batches, 0

        def __iter__(self):
            self.passes += 1
            return iter(self.batches)

    loader, targets = Counted(train), Counted(test)
    plain = TRAK(nets[0], TASK, proj_dim=8, progress=False).featurize(loader, states).score(targets)
    assert loader.passes == 1 and targets.passes == 1
    x, y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    stored = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "s", progress=False).featurize(data, states)
    torch.testing.assert_close(stored.score(test), plain, rtol=1e-5, atol=1e-7)
    short = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, drop_last=True)
    dropped = TRAK(nets[0], TASK, proj_dim=8, store=tmp_path / "t", progress=False).featurize(short, states[:1])
    assert dropped._models[0]["features"].shape == (48, 8)  # rows counted, not taken from the dataset's length


def test_checkpoint_paths_and_errors(tmp_path):
    nets, train, test = setting(models=1)
    path = tmp_path / "m.pt"
    torch.save(nets[0].state_dict(), path)
    from_path = TRAK(nets[0], TASK, proj_dim=8, progress=False).featurize(train, [path]).score(test)
    from_dict = TRAK(nets[0], TASK, proj_dim=8, progress=False).featurize(train, [nets[0].state_dict()]).score(test)
    torch.testing.assert_close(from_path, from_dict)
    trak = TRAK(nets[0], TASK, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="featurize"):
        trak.score(test)
    with pytest.raises(ValueError, match="checkpoints"):
        trak.featurize(train, [])
    with pytest.raises(TypeError, match="task"):
        TRAK(nets[0], "multiclass")
    with pytest.raises(ValueError, match="kind"):
        TRAK(nets[0], TASK, kind="fast_jl")
    with pytest.raises(TypeError, match="progress: expected True or False"):
        TRAK(nets[0], TASK, progress=1)
    with pytest.raises(ValueError, match="proj_dim"):
        TRAK(nets[0], TASK, proj_dim=24, kind="factored")
    factored = TRAK(nets[0], TASK, proj_dim=16, kind="factored", progress=False).featurize(train, [path])
    assert factored.score(test).shape == (7, 60)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    nets, train, test = setting(models=2)
    states = [n.state_dict() for n in nets]
    for progress, shown in [(True, True), (False, False)]:
        monkeypatch.setattr(sys, "stderr", Terminal())
        TRAK(nets[0], TASK, proj_dim=8, progress=progress).featurize(train, states)
        text = sys.stderr.getvalue()
        assert ("featurize" in text and "4/4" in text) == shown and (text == "") != shown
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: silent even when asked
    TRAK(nets[0], TASK, proj_dim=8).featurize(train, states)
    assert sys.stderr.getvalue() == ""


def test_contrastive_task_prepares_a_reference_per_checkpoint():
    """CLIP-style TRAK: each checkpoint gets its own reference embeddings, reused for its targets."""
    from test_tasks import DualEncoder, pair_batches, tiny

    from attrprims.tasks import ContrastiveImageText

    train = pair_batches((4, 3, 5))
    nets = [tiny(DualEncoder(with_scale=True)) for _ in range(2)]
    for i, net in enumerate(nets):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * i)
    task = ContrastiveImageText(reference_size=6, scale=None)
    trak = TRAK(nets[0], task, proj_dim=8, progress=False).featurize(train, [n.state_dict() for n in nets])
    references = [task.reference for task in trak.runner.tasks]
    assert not torch.equal(references[0][0], references[1][0])  # prepared per checkpoint
    scores = trak.score(train[:1])
    assert scores.shape == (4, 12) and torch.isfinite(scores).all()
    ranked = trak.score(train[:1], topk=3)
    assert torch.equal(ranked.top_indices, scores.topk(3).indices)
