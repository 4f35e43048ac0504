"""attrprims.per_sample_grads / project_grads: both paths against a loop of single-example backward passes."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import models
import reference
from attrprims import FactoredProjector, Projector, param_layout, per_sample_grads, project_grads

SETTINGS = ["mlp", "mlp_nobias", "cnn", "lm", "lm_len1", "attention"]
PATHS = ["generic", "layer"]
FACTORED_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def expected(name, n, params=None):
    model, out, batch, args = models.setting(name, n)
    layout = param_layout(model, params)
    return model, out, batch, layout, reference.per_sample_grads(model, out, batch, layout.names, args)


def assert_projected_close(out, grads, matrix):
    """Float32 projection of float64 gradients: |out - g M| <= 1e-5 · (|g| |M|), row by row."""
    assert out.dtype == torch.float32 and out.shape == (grads.shape[0], matrix.shape[1])
    err = (out.double() - grads @ matrix).abs()
    assert (err <= 1e-5 * (grads.abs() @ matrix.abs()) + 1e-12).all(), float(err.max())


def factored_blocks(model, layout):
    """(offset, d_out, d_in) of the weights the layer path projects with Kronecker factors."""
    blocks = []
    for m in model.modules():
        weight = m.__dict__["_parameters"].get("weight")
        if isinstance(m, FACTORED_TYPES) and weight is not None:
            name = next(n for n, t in model.named_parameters() if t is weight)
            blocks.append((layout.offset(name), weight.shape[0], weight[0].numel()))
    return blocks


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("n", [1, 4])
def test_per_sample_grads_match_loop(name, path, n):
    model, out, batch, layout, ref = expected(name, n)
    grads = per_sample_grads(model, out, batch, path=path)
    assert list(grads) == list(layout.names)
    for (g_name, g), shape in zip(grads.items(), layout.shapes):
        assert g.shape == (n, *shape) and g.dtype == torch.float64, g_name
    flat = per_sample_grads(model, out, batch, path=path, flat=True)
    assert flat.shape == (n, layout.p)
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.cat([g.reshape(n, -1) for g in grads.values()], 1), ref, rtol=1e-9, atol=1e-11)


@pytest.fixture(params=["staged", "per layer"])
def staging(request, monkeypatch):
    """The layer path gathers a small batch's gradients for one projection call, or projects layer by layer."""
    if request.param == "per layer":
        # attrprims.per_sample_grads is also the function's name: the module is reached through importlib.
        monkeypatch.setattr(importlib.import_module("attrprims.per_sample_grads"), "_STAGE_BUDGET", 0)
    return request.param


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
def test_project_grads_equals_projected_materialised(name, path, staging):
    model, out, batch, layout, ref = expected(name, 3)
    projector = Projector(layout.p, 37, seed=5)
    matrix = projector.matrix().double()
    chunks = [1, 50, 10**9, None] if path == "generic" else [None]
    for chunk in chunks:
        assert_projected_close(project_grads(model, out, batch, projector, path=path, chunk=chunk), ref, matrix)


@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn", "lm", "lm_len1", "attention"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_factored_projection_equals_kronecker_matrix(name, kind):
    model, out, batch, layout, ref = expected(name, 3)
    projector = FactoredProjector(layout.p, 4, 3, seed=11, kind=kind)
    matrix = reference.factored_matrix(projector, factored_blocks(model, layout))
    for path in PATHS:
        assert_projected_close(project_grads(model, out, batch, projector, path=path), ref, matrix)


def group_sums(ref, ids, count):
    """Reference group rows: the per-example gradients [n, p] summed by id."""
    return torch.zeros(count, ref.shape[1], dtype=ref.dtype).index_add_(0, ids, ref)


GROUPINGS = [([0, 0, 0, 0, 0], 1), ([0, 1, 2, 3, 4], 5), ([2, 0, 2, 1, 0], 3), ([1, 1, 3, 1, 0], 4)]  # 4: 2 unused


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_group_rows_are_sums_of_member_gradients(name, path, grouping, staging):
    ids, count = torch.tensor(grouping[0]), grouping[1]
    model, out, batch, layout, ref = expected(name, 5)
    want = group_sums(ref, ids, count)
    flat = per_sample_grads(model, out, batch, path=path, flat=True, groups=ids)
    torch.testing.assert_close(flat, want, rtol=1e-9, atol=1e-11)
    grads = per_sample_grads(model, out, batch, path=path, groups=ids)
    assert all(g.shape == (count, *shape) for g, shape in zip(grads.values(), layout.shapes))
    dense = Projector(layout.p, 19, seed=2)
    assert_projected_close(project_grads(model, out, batch, dense, path=path, groups=ids), want,
                           dense.matrix().double())
    factored = FactoredProjector(layout.p, 4, 3, seed=7)
    assert_projected_close(project_grads(model, out, batch, factored, path=path, groups=ids), want,
                           reference.factored_matrix(factored, factored_blocks(model, layout)))


@given(ids=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=9))
def test_groups_of_any_layout_on_a_conv_net(ids):
    model, out, batch, layout, ref = expected("cnn", len(ids))
    ids = torch.tensor(ids)
    flat = per_sample_grads(model, out, batch, path="layer", flat=True, groups=ids)
    torch.testing.assert_close(flat, group_sums(ref, ids, int(ids.max()) + 1), rtol=1e-9, atol=1e-11)


def test_finite_check_is_not_fooled_by_overflowing_sums():
    """Rows whose sums overflow are looked at closely, not reported."""
    from attrprims.per_sample_grads import _check_finite_rows

    big = torch.full((3, 4), 3e38)  # finite, though every row sums to inf in float32
    _check_finite_rows(3, [big])
    big[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"examples \[1\] are not finite"):
        _check_finite_rows(3, [big])


def test_bad_groups_are_named():
    model, out, batch, _ = models.setting("mlp", 3)
    for bad, match in [(torch.tensor([0, 1]), r"groups: expected shape \[3\]"),
                       (torch.tensor([0.0, 1.0, 0.0]), "groups: expected integer"),
                       (torch.tensor([0, -1, 0]), "groups: expected ids >= 0"), ("abc", "groups")]:
        with pytest.raises((ValueError, TypeError), match=match):
            per_sample_grads(model, out, batch, groups=bad)


@given(chunk=st.integers(min_value=1, max_value=400), seed=st.integers(min_value=0, max_value=2**64 - 1))
def test_chunking_does_not_change_the_projection(chunk, seed):
    model, out, batch, _ = models.setting("mlp", 2)
    projector = Projector(param_layout(model).p, 16, seed=seed)
    whole = project_grads(model, out, batch, projector, chunk=10**9)
    torch.testing.assert_close(project_grads(model, out, batch, projector, chunk=chunk), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_params_restrict_the_gradient(path):
    model, out, batch, _ = models.setting("mlp", 3)
    last = ["4.weight", "4.bias"]
    for p in model.parameters():
        p.requires_grad_(False)  # selected parameters count even when frozen
    _, _, _, layout, ref = expected("mlp", 3, params=last)
    grads = per_sample_grads(model, out, batch, params=[model[4].bias, "4.weight"], path=path)
    assert list(grads) == last
    torch.testing.assert_close(torch.cat([g.reshape(3, -1) for g in grads.values()], 1), ref)
    assert not any(p.requires_grad for p in model.parameters())


def test_tied_parameter_selected_by_either_name():
    model, *_ = models.setting("lm", 2)
    assert param_layout(model, ["head.weight"]).names == ("embed.weight",)


@pytest.mark.parametrize("path", PATHS)
def test_several_inputs_and_mapping_batches(path):
    model = models.TwoInputs().double()
    x, z = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    out = lambda outputs, batch: outputs.sum(1)  # noqa: E731
    ref = reference.per_sample_grads(model, out, (x, z), param_layout(model).names, lambda b: (b, {}))
    by_position = per_sample_grads(model, out, (x, z), inputs=lambda b: (b[0], b[1]), path=path, flat=True)
    by_keyword = per_sample_grads(model, out, {"x": x, "z": z}, path=path, flat=True)
    torch.testing.assert_close(by_position, ref)
    torch.testing.assert_close(by_keyword, ref)


def test_empty_batch():
    model, out, batch, _ = models.setting("mlp", 0)
    p = param_layout(model).p
    assert per_sample_grads(model, out, batch, flat=True).shape == (0, p)
    assert per_sample_grads(model, out, batch, path="layer", flat=True).shape == (0, p)
    assert project_grads(model, out, batch, Projector(p, 8)).shape == (0, 8)


def test_zero_dim_parameters():
    """A scalar parameter (open_clip's logit_scale) is one column of the flat gradients on every path."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.scale = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.linear(x) * self.scale

    torch.manual_seed(0)
    model, batch = Scaled(), (torch.randn(4, 3),)
    out = lambda o, b: o.sum(-1)  # noqa: E731
    names = param_layout(model).names
    ref = reference.per_sample_grads(model, out, batch, names, lambda b: ((b[0],), {}))
    for path in ("generic", "layer"):
        torch.testing.assert_close(per_sample_grads(model, out, batch, path=path, flat=True).double(), ref)
    P = Projector(param_layout(model).p, 5)
    torch.testing.assert_close(project_grads(model, out, batch, P, path="layer").double(),
                               ref @ P.matrix().double(), rtol=1e-5, atol=1e-6)


def test_unsupported_layers_fall_back_or_are_named():
    model, out, batch, layout, ref = expected("lm", 2)  # the positional parameter has no layer rule
    torch.testing.assert_close(per_sample_grads(model, out, batch, path="layer", flat=True), ref)
    with pytest.raises(ValueError, match=r"model: the layer path does not support model \(TinyLM\)"):
        per_sample_grads(model, out, batch, path="layer", fallback=False)


# Errors ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [lambda o, b: o.sum(), lambda o, b: o, lambda o, b: o[:, :1], lambda o, b: o.argmax(1)])
def test_output_fn_shape_is_checked(path, bad):
    model, _, batch, _ = models.setting("mlp", 3)
    with pytest.raises(ValueError, match=r"output_fn: expected a floating tensor of shape \[n\]"):
        per_sample_grads(model, bad, batch, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_gradients_name_the_examples(path):
    model, out, (x, y), _ = models.setting("mlp", 5)
    x[1, 0] = float("nan")
    x[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"batch: the gradients of examples \[1, 3\] are not finite"):
        per_sample_grads(model, out, (x, y), path=path)
    with pytest.raises(ValueError, match=r"examples \[1, 3\]"):
        project_grads(model, out, (x, y), Projector(param_layout(model).p, 8), path=path)


def test_batchnorm_in_train_mode():
    model, out, batch, _ = models.setting("cnn", 4)
    model.train()
    with pytest.warns(UserWarning, match=r"model: BatchNorm layer\(s\) '1', '7' normalise .* ill-defined"):
        per_sample_grads(model, out, batch, path="layer")
    with pytest.raises(ValueError, match="model: BatchNorm.*call model.eval"):
        per_sample_grads(model, out, batch, path="generic")


def test_argument_errors():
    model, out, batch, _ = models.setting("mlp", 3)
    p = param_layout(model).p
    with pytest.raises(ValueError, match=r"params: 'fc9.weight' is not a parameter of the model"):
        per_sample_grads(model, out, batch, params=["fc9.weight"])
    with pytest.raises(ValueError, match="params: a tensor of shape"):
        per_sample_grads(model, out, batch, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="params: selects no parameters"):
        per_sample_grads(model, out, batch, params=[])
    with pytest.raises(ValueError, match="path: expected one of"):
        per_sample_grads(model, out, batch, path="vmap")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        per_sample_grads(lambda x: x, out, batch)
    with pytest.raises(ValueError, match=r"projector: expected p == 111 .* got p = 110"):
        project_grads(model, out, batch, Projector(p - 1, 8))
    with pytest.raises(ValueError, match=r"batch: every tensor must have the examples as its first dimension"):
        per_sample_grads(model, out, (batch[0], batch[1][:2]))


@pytest.mark.parametrize("name", ["cnn", "lm"])
def test_every_path_and_projector_on_each_device(device, name, staging):
    model, out, batch, layout, ref = expected(name, 3)
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    dense = Projector(layout.p, 24, seed=3)
    factored = FactoredProjector(layout.p, 4, 6, seed=3)
    matrices = {dense: dense.matrix().double(),
                factored: reference.factored_matrix(factored, factored_blocks(model, layout))}
    ids = torch.tensor([1, 0, 1], device=device)
    grouped = group_sums(ref, ids.cpu(), 2)
    for path in PATHS:
        torch.testing.assert_close(per_sample_grads(model, out, batch, path=path, flat=True).cpu(), ref)
        torch.testing.assert_close(per_sample_grads(model, out, batch, path=path, flat=True, groups=ids).cpu(),
                                   grouped)
        for projector, matrix in matrices.items():
            projected = project_grads(model, out, batch, projector, path=path)
            assert projected.device.type == device.type
            assert_projected_close(projected.cpu(), ref, matrix)
            assert_projected_close(project_grads(model, out, batch, projector, path=path, groups=ids).cpu(),
                                   grouped, matrix)
