"""attrprims.tasks: each task's f and Q against naive float64 formulas, and its per-example gradients under vmap
(per_sample_grads path="generic") against path="layer" and a loop of single-example backward passes."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import reference
from attrprims import (BinaryClassification, ContrastiveImageText, LanguageModeling, MultiClassClassification, Task,
                       TextClassification, param_layout, per_sample_grads)
from attrprims._batches import model_args

VOCAB = 11


class TextClassifier(nn.Module):
    """Embedding, masked mean over tokens, Linear; returns logits or, like Hugging Face, an object with .logits."""

    def __init__(self, wrapped=False):
        super().__init__()
        self.embed, self.head, self.wrapped = nn.Embedding(VOCAB, 6), nn.Linear(6, 4), wrapped

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embed(input_ids) * mask.unsqueeze(-1).to(self.embed.weight.dtype)
        logits = self.head(torch.tanh(h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)))
        return SimpleNamespace(logits=logits) if self.wrapped else logits


class DualEncoder(nn.Module):
    """CLIP-style: a Linear image encoder, an Embedding + Linear text encoder, unit-norm embeddings, and optionally a
    learned logit scale as third output (as open_clip returns it)."""

    def __init__(self, with_scale=False):
        super().__init__()
        self.image, self.embed, self.text = nn.Linear(12, 5), nn.Embedding(VOCAB, 6), nn.Linear(6, 5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(3.0))) if with_scale else None  # 0-dim, as open_clip

    def forward(self, images, texts):
        u = F.normalize(self.image(images.flatten(1)), dim=-1)
        v = F.normalize(self.text(self.embed(texts).mean(1)), dim=-1)
        return (u, v) if self.logit_scale is None else (u, v, self.logit_scale.exp())


class CausalLM(nn.Module):
    """Embedding, a causal running mean of the (masked) embeddings, Linear head: logits [n, T, V]."""

    def __init__(self, wrapped=False):
        super().__init__()
        self.embed, self.head, self.wrapped = nn.Embedding(VOCAB, 6), nn.Linear(6, VOCAB), wrapped

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)
        logits = self.head(torch.tanh(h.cumsum(1) / steps.unsqueeze(-1)))
        return SimpleNamespace(logits=logits) if self.wrapped else logits


def tiny(module):
    torch.manual_seed(0)
    return module.double().eval()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def check_grads(model, task, batch):
    """Generic (vmap) and layer paths agree with each other and with one backward pass per example."""
    names = param_layout(model).names
    generic = per_sample_grads(model, task.output, batch, inputs=task.inputs, path="generic", flat=True)
    layer = per_sample_grads(model, task.output, batch, inputs=task.inputs, path="layer", flat=True)
    loop = reference.per_sample_grads(model, task.output, batch, names, lambda ex: model_args(task.inputs, ex))
    assert generic.abs().sum() > 0
    torch.testing.assert_close(generic, loop, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(layer, loop, rtol=1e-9, atol=1e-11)


def naive_softmax(row):
    e = [math.exp(x) for x in row.tolist()]
    return [x / sum(e) for x in e]


def naive_multiclass(logits, labels):
    """(f, Q) per example: log(p_y / (1 − p_y)) and 1 − p_y from a plain softmax, in float64."""
    f, q = [], []
    for row, y in zip(logits, labels.tolist()):
        p = naive_softmax(row)[y]
        f.append(math.log(p / (1 - p)))
        q.append(1 - p)
    return torch.tensor(f, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)


# Base task


def test_base_task_reads_inputs_and_prepare_does_nothing():
    task, x = Task(), torch.zeros(3, 2)
    assert task.inputs((x, torch.zeros(3))) is x and task.inputs(x) is x
    assert task.prepare(nn.Linear(2, 1), [(x,)]) is None
    with pytest.raises(NotImplementedError):
        task.output(x, x)
    with pytest.raises(NotImplementedError):
        task.out_to_loss(x, x)
    assert task.config() == {"name": "task"} and repr(task) == "Task()"


@pytest.mark.parametrize("task, config", [
    (MultiClassClassification(), {"name": "multiclass"}),
    (BinaryClassification(), {"name": "binary"}),
    (TextClassification(label_key="label"), {"name": "text_classification", "label_key": "label"}),
    (ContrastiveImageText(reference_size=7, seed=3, scale=None),
     {"name": "contrastive_image_text", "reference_size": 7, "seed": 3, "scale": None}),
    (LanguageModeling(), {"name": "language_modeling"}),
])
def test_config_names_the_task_and_its_options(task, config):
    assert task.config() == config and json.loads(json.dumps(config)) == config
    assert repr(task).startswith(type(task).__name__ + "(")


# Multi-class and binary classification


def test_multiclass_margin_and_q_match_naive():
    logits = torch.randn(6, 4, generator=generator(), dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (6,), generator=generator(1))
    task, batch = MultiClassClassification(), (torch.zeros(6, 1), labels)
    f, q = naive_multiclass(logits, labels)
    torch.testing.assert_close(task.output(logits, batch), f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.out_to_loss(logits, batch), q, rtol=1e-12, atol=1e-12)


def test_multiclass_grads_under_vmap_match_layer_path():
    model, _, batch, _ = models.setting("mlp", 5)
    check_grads(model, MultiClassClassification(), batch)


@pytest.mark.parametrize("shape", [(5,), (5, 1)])
def test_binary_log_odds_and_q_match_naive(shape):
    logits = torch.randn(shape, generator=generator(), dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 1, 0, 1])
    task, batch = BinaryClassification(), (torch.zeros(5, 1), labels)
    p = [1 / (1 + math.exp(-float(z))) for z in logits.flatten()]
    correct = [pi if y else 1 - pi for pi, y in zip(p, labels.tolist())]
    f = torch.tensor([math.log(c / (1 - c)) for c in correct], dtype=torch.float64)
    torch.testing.assert_close(task.output(logits, batch), f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.out_to_loss(logits, batch), 1 - torch.tensor(correct, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_binary_grads_under_vmap_match_layer_path():
    model = tiny(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
    batch = (torch.randn(5, 3, generator=generator(), dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    check_grads(model, BinaryClassification(), batch)


@pytest.mark.parametrize("task", [MultiClassClassification(), BinaryClassification()])
@pytest.mark.parametrize("batch", [torch.zeros(3, 2), {"x": torch.zeros(3, 2)}, (torch.zeros(3, 2),)])
def test_classification_rejects_batches_without_labels(task, batch):
    with pytest.raises(ValueError, match="batch"):
        task.output(torch.zeros(3, 2), batch)


# Text classification


def text_batch(n=5, length=6, layout="mapping", label_key="labels"):
    g = generator(2)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=g)).long()
    labels = torch.randint(0, 4, (n,), generator=g)
    if layout == "mapping":
        return {"input_ids": ids, "attention_mask": mask, label_key: labels}
    return (ids, mask, labels) if layout == "tuple" else (ids, labels)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("layout", ["mapping", "tuple", "tuple2"])
def test_text_classification_margin_and_q_match_naive(layout, wrapped):
    model, task, batch = tiny(TextClassifier(wrapped)), TextClassification(), text_batch(layout=layout)
    inputs = task.inputs(batch)
    assert sorted(inputs) == (["input_ids"] if layout == "tuple2" else ["attention_mask", "input_ids"])
    outputs = model(**inputs)
    f, q = naive_multiclass(getattr(outputs, "logits", outputs), batch["labels"] if layout == "mapping" else batch[-1])
    torch.testing.assert_close(task.output(outputs, batch), f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.out_to_loss(outputs, batch), q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["mapping", "tuple"])
def test_text_classification_grads_under_vmap_match_layer_path(layout):
    check_grads(tiny(TextClassifier(wrapped=layout == "tuple")), TextClassification(), text_batch(layout=layout))


def test_text_classification_reads_its_label_key():
    task, batch = TextClassification(label_key="label"), text_batch(label_key="label")
    assert "label" not in task.inputs(batch)
    torch.testing.assert_close(task.output(torch.eye(4)[batch["label"]].double(), batch),
                               torch.full((5,), 1 - math.log(3), dtype=torch.float64))


@pytest.mark.parametrize("batch", [torch.zeros(3, 4, dtype=torch.long), (torch.zeros(3, 4, dtype=torch.long),),
                                   (torch.zeros(3, 4),) * 4, {"input_ids": torch.zeros(3, 4, dtype=torch.long)}])
def test_text_classification_rejects_bad_batches(batch):
    with pytest.raises(ValueError, match="batch"):
        TextClassification().inputs(batch)


def test_text_classification_rejects_outputs_without_logits():
    with pytest.raises(ValueError, match="outputs"):
        TextClassification().output([torch.zeros(5, 4)], text_batch())


# Contrastive image-text


def pairs(n, seed=0):
    g = generator(seed)
    return torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, VOCAB, (n, 4), generator=g)


def pair_batches(sizes=(4, 3, 5, 2)):
    images, texts = pairs(sum(sizes), seed=1)
    return list(zip(images.split(list(sizes)), texts.split(list(sizes))))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def naive_clip(u, v, ref_u, ref_v, scale):
    """(f, Q) per pair from sums over the reference pairs, one term at a time, in float64."""
    f, q = [], []
    for ui, vi in zip(u.tolist(), v.tolist()):
        own = dot(ui, vi)
        a = -math.log(sum(math.exp(scale * (dot(ui, t) - own)) for t in ref_v.tolist()))
        b = -math.log(sum(math.exp(scale * (dot(s, vi) - own)) for s in ref_u.tolist()))
        f.append(a + b)
        q.append(1 - (1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(-b))) / 2)
    return torch.tensor(f, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)


def test_contrastive_reference_is_the_seeded_sample_of_training_pairs():
    model, batches = tiny(DualEncoder()), pair_batches()
    task = ContrastiveImageText(reference_size=5, seed=4)
    task.prepare(model, batches)
    g = generator(4)
    keys = torch.cat([torch.rand(len(b[0]), generator=g, dtype=torch.float64) for b in batches])
    chosen = keys.argsort()[:5]
    with torch.no_grad():
        u, v = model(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    torch.testing.assert_close(task.reference[0], u[chosen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.reference[1], v[chosen], rtol=1e-12, atol=1e-12)
    again = ContrastiveImageText(reference_size=5, seed=4)
    again.prepare(model, iter(batches))
    assert all(torch.equal(a, b) for a, b in zip(task.reference, again.reference))
    keyword = ContrastiveImageText(reference_size=5, seed=4)
    keyword.prepare(model, [{"images": images, "texts": texts} for images, texts in batches])
    assert all(torch.equal(a, b) for a, b in zip(task.reference, keyword.reference))
    other = ContrastiveImageText(reference_size=5, seed=5)
    other.prepare(model, batches)
    assert not torch.equal(other.reference[0], task.reference[0])
    everything = ContrastiveImageText(reference_size=100)
    everything.prepare(model, batches)
    assert everything.reference[0].shape == (14, 5)


@pytest.mark.parametrize("scale", [1.0, 2.5, None])
def test_contrastive_log_odds_and_q_match_naive(scale):
    model, task = tiny(DualEncoder(with_scale=scale is None)), ContrastiveImageText(reference_size=6, scale=scale)
    task.prepare(model, pair_batches())
    batch = pairs(4, seed=7)
    outputs = model(*task.inputs(batch))
    f, q = naive_clip(outputs[0], outputs[1], *task.reference, outputs[2].detach().item() if scale is None else scale)
    torch.testing.assert_close(task.output(outputs, batch), f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(task.out_to_loss(outputs, batch), q, rtol=1e-10, atol=1e-12)
    alone = model(*task.inputs(tuple(t[2:3] for t in batch)))
    torch.testing.assert_close(task.output(alone, batch), f[2:3], rtol=1e-12, atol=1e-12)  # no in-batch terms


def test_contrastive_reads_hugging_face_outputs():
    task = ContrastiveImageText(reference_size=3)
    task.prepare(tiny(DualEncoder()), pair_batches())
    u, v = task.reference[0] + 0.1, task.reference[1] - 0.2
    torch.testing.assert_close(task.output(SimpleNamespace(image_embeds=u, text_embeds=v), None),
                               task.output((u, v), None))


@pytest.mark.parametrize("scale", [1.0, None])
def test_contrastive_grads_under_vmap_match_layer_path(scale):
    model, task = tiny(DualEncoder(with_scale=scale is None)), ContrastiveImageText(reference_size=6, scale=scale)
    task.prepare(model, pair_batches())
    check_grads(model, task, pairs(4, seed=7))


def test_contrastive_errors_name_the_cause():
    task, model = ContrastiveImageText(reference_size=3), tiny(DualEncoder())
    u = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="prepare"):
        task.output((u, u), None)
    with pytest.raises(ValueError, match="train_batches"):
        task.prepare(model, [])
    task.prepare(model, pair_batches())
    with pytest.raises(ValueError, match="outputs"):
        task.output((u[:, :4], u[:, :4]), None)
    with pytest.raises(ValueError, match="outputs"):
        task.output(u, None)
    unscaled = ContrastiveImageText(reference_size=3, scale=None)
    unscaled.prepare(model, pair_batches())
    with pytest.raises(ValueError, match="outputs"):
        unscaled.output((u, u), None)
    for batch in (pairs(2)[0], pairs(2) + (u,)):
        with pytest.raises(ValueError, match="batch"):
            task.inputs(batch)
    with pytest.raises(ValueError, match="reference_size"):
        ContrastiveImageText(reference_size=0)
    with pytest.raises(ValueError, match="scale"):
        ContrastiveImageText(scale=-1.0)


# Language modelling


def lm_batch(n=4, length=6, layout="mapping"):
    g = generator(3)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = (torch.arange(length) < torch.randint(2, length + 1, (n, 1), generator=g)).long()
    labels = ids.masked_fill(torch.rand(n, length, generator=g) < 0.2, -100)
    if layout == "tensor":
        return ids
    if layout == "tuple":
        return (ids, mask, labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_lm(logits, ids, mask, labels):
    """(f, Q) per sequence: the sum over scored positions t ≥ 1 of log p(labels[t] | logits[t − 1]), and
    1 − exp(its mean), one token at a time in float64."""
    f, q = [], []
    for i in range(ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, ids.shape[1]):
            if mask[i, t] and labels[i, t] != -100:
                total += math.log(naive_softmax(logits[i, t - 1])[labels[i, t]])
                count += 1
        f.append(total)
        q.append(1 - math.exp(total / count) if count else 0.0)
    return torch.tensor(f, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("layout", ["tensor", "tuple", "mapping"])
def test_language_modeling_sum_log_prob_and_q_match_naive(layout, wrapped):
    model, task, batch = tiny(CausalLM(wrapped)), LanguageModeling(), lm_batch(layout=layout)
    args, kwargs = model_args(task.inputs, batch)
    assert "labels" not in kwargs
    outputs = model(*args, **kwargs)
    full = lm_batch()
    if layout == "tensor":
        full = {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch}
    f, q = naive_lm(getattr(outputs, "logits", outputs), full["input_ids"], full["attention_mask"], full["labels"])
    torch.testing.assert_close(task.output(outputs, batch), f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(task.out_to_loss(outputs, batch), q, rtol=1e-12, atol=1e-12)


def test_language_modeling_single_token_sequences_score_nothing():
    task, ids = LanguageModeling(), torch.zeros(3, 1, dtype=torch.long)
    logits = torch.randn(3, 1, VOCAB, dtype=torch.float64)
    assert torch.equal(task.output(logits, ids), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(task.out_to_loss(logits, ids), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["tensor", "tuple", "mapping"])
def test_language_modeling_grads_under_vmap_match_layer_path(layout):
    check_grads(tiny(CausalLM(wrapped=layout == "mapping")), LanguageModeling(), lm_batch(layout=layout))


def test_language_modeling_errors_name_the_argument():
    task, ids = LanguageModeling(), torch.zeros(3, 4, dtype=torch.long)
    for batch in [(ids,) * 4, (), {"ids": ids}, [ids, ids, ids, ids]]:
        with pytest.raises(ValueError, match="batch"):
            task.output(torch.zeros(3, 4, VOCAB), batch)
    for logits in [torch.zeros(3, 5, VOCAB), torch.zeros(3, VOCAB)]:
        with pytest.raises(ValueError, match="outputs"):
            task.output(logits, ids)
    with pytest.raises(ValueError, match="batch"):
        per_sample_grads(tiny(CausalLM()), task.output, {"ids": ids}, inputs=lambda b: b["ids"])


def test_losses_match_torch():
    """Each task's per-example loss equals torch's loss function for it (and −log σ(f) for the log-odds tasks)."""
    g = generator(5)
    logits, labels = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    multi = MultiClassClassification()
    ce = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(multi.loss(logits, (None, labels)), ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(multi.loss(logits, (None, labels)), F.softplus(-multi.output(logits, (None, labels))),
                               rtol=1e-12, atol=1e-12)
    text = TextClassification()
    torch.testing.assert_close(text.loss(SimpleNamespace(logits=logits), {"input_ids": None, "labels": labels}), ce,
                               rtol=1e-12, atol=1e-12)
    logit, y = logits[:, 0], (labels % 2).double()
    torch.testing.assert_close(BinaryClassification().loss(logit, (None, y)),
                               F.binary_cross_entropy_with_logits(logit, y, reduction="none"), rtol=1e-12, atol=1e-12)
    clip = ContrastiveImageText(reference_size=6)
    model = tiny(DualEncoder())
    clip.prepare(model, pair_batches())
    batch = pairs(4, seed=7)
    outputs = model(*clip.inputs(batch))
    u, v = outputs
    ref_u, ref_v = clip.reference
    image_ce = F.cross_entropy(torch.cat([(u * v).sum(-1, keepdim=True), u @ ref_v.T], 1), torch.zeros(4).long(),
                               reduction="none")
    text_ce = F.cross_entropy(torch.cat([(u * v).sum(-1, keepdim=True), v @ ref_u.T], 1), torch.zeros(4).long(),
                              reduction="none")
    # The reference holds the pair itself among its negatives when drawn, as f does; softplus(−a) is exactly
    # −log(e^s / (e^s + Σ_j e^{s_j})) = cross-entropy with the own pair as class 0.
    torch.testing.assert_close(clip.loss(outputs, batch), (image_ce + text_ce) / 2, rtol=1e-10, atol=1e-12)
    lm, model = LanguageModeling(), tiny(CausalLM())
    batch = lm_batch()
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    token_ce = F.cross_entropy(out[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(lm.loss(out, batch), token_ce.sum(-1), rtol=1e-12, atol=1e-12)
