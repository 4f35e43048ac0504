"""Tasks: what an attribution method attributes, for a kind of model and data.

A task says how a batch feeds the model (`inputs`), which scalar per example is attributed (`output`, TRAK's
model output function f), TRAK's out-to-loss term (`out_to_loss`, the diagonal of Q: how much the loss moves
per unit of output) and the per-example training loss (`loss`, whose gradients influence functions, TracIn and
Grad-Dot/Cos use). Methods call these four, and `prepare` once per checkpoint, and nothing else, so a new kind
of model needs only a new task: subclass `Task` and override what differs. `config()` names the task and its
options; feature stores record it and refuse to mix features made under another task.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils import _pytree as pytree

from ._batches import batch_size, model_args


class Task:
    """Base task: batches are tensors, tuples/lists (inputs first, as per_sample_grads reads them) or mappings.

    Subclasses override `output` and `out_to_loss` (and `inputs` for other batch layouts). Each returns one value
    per example ([n]) and must work under torch.func.vmap (per-example calls see one example at a time).
    """

    name = "task"

    def inputs(self, batch):
        """The model's arguments for `batch`: a tensor (one positional argument), a tuple or a mapping."""
        if isinstance(batch, (tuple, list)):
            return batch[0]
        return batch

    def output(self, outputs, batch) -> torch.Tensor:
        """f: [n] model output function per example, whose gradients are attributed."""
        raise NotImplementedError

    def out_to_loss(self, outputs, batch) -> torch.Tensor:
        """[n] ∂loss/∂f per example (TRAK's Q), evaluated at the trained model."""
        raise NotImplementedError

    def loss(self, outputs, batch) -> torch.Tensor:
        """[n] the training loss per example (the one the model was trained to minimise, before averaging)."""
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable identity of the task (its name and options)."""
        return {"name": self.name}

    def prepare(self, model, train_batches) -> None:
        """Get ready for one checkpoint; methods call this once per checkpoint, its weights loaded, before featurizing.

        Equivalent to doing nothing. Tasks whose output depends on the model beyond the example itself override it
        (ContrastiveImageText embeds its reference pairs here).

        Args:
            model: the nn.Module holding the checkpoint's weights.
            train_batches: iterable of training batches, in the layout this task reads.
        """

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({options})"


def _labels(batch) -> torch.Tensor:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"batch: expected (inputs, labels), got {type(batch).__name__}")
    return batch[1]


class MultiClassClassification(Task):
    """Classification with logits [n, C] and integer labels: batches (inputs, labels).

    Equivalent to TRAK's choice (Park et al. 2023, Sec. 3): f = log(p_y / (1 − p_y)) = logit_y − logsumexp of the
    other logits (the margin), and Q = 1 − p_y with p = softmax(logits). The loss is cross-entropy, −log p_y.
    """

    name = "multiclass"

    def output(self, outputs, batch):
        y = _labels(batch).long()  # gather needs int64; int32 labels are common
        correct = outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        is_label = torch.arange(outputs.shape[-1], device=outputs.device) == y.unsqueeze(-1)  # vmap-safe one-hot
        others = outputs.masked_fill(is_label, float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def out_to_loss(self, outputs, batch):
        y = _labels(batch).long()
        return 1.0 - torch.softmax(outputs, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def loss(self, outputs, batch):
        y = _labels(batch).long()
        return torch.logsumexp(outputs, dim=-1) - outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)


class BinaryClassification(Task):
    """Binary classification with one logit per example ([n] or [n, 1]) and labels in {0, 1}.

    Equivalent to f = (2y − 1)·logit (the log-odds of the correct class, TRAK's margin for two classes) and
    Q = 1 − σ(f), one minus the probability of the correct class. The loss is binary cross-entropy, −log σ(f).
    """

    name = "binary"

    def output(self, outputs, batch):
        y = _labels(batch)
        logit = outputs.reshape(y.shape)
        return (2.0 * y.to(logit.dtype) - 1.0) * logit

    def out_to_loss(self, outputs, batch):
        return 1.0 - torch.sigmoid(self.output(outputs, batch))

    def loss(self, outputs, batch):
        return torch.nn.functional.softplus(-self.output(outputs, batch))


def _logits(outputs) -> torch.Tensor:
    """The logits of a model's outputs: the tensor itself or its `.logits` (Hugging Face models)."""
    logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"outputs: expected a logits tensor or an object with a .logits tensor, got "
                         f"{type(outputs).__name__}")
    return logits


class TextClassification(MultiClassClassification):
    """Sequence classification over tokens: logits [n, C] (or an output with `.logits`) and integer labels [n].

    Equivalent to MultiClassClassification on the logits (f = logit_y − logsumexp of the others, Q = 1 − p_y), as
    traker's TextClassificationModelOutput (whose Q temperature, 1 by default, is left out). Batches are mappings,
    whose keys other than `label_key` are the model's keyword arguments, or tuples (input_ids[, attention_mask],
    labels), fed as model(input_ids=..., attention_mask=...).

    Args:
        label_key: the labels' key in mapping batches (Hugging Face collators use "labels").
    """

    name = "text_classification"

    def __init__(self, label_key: str = "labels"):
        self.label_key = label_key

    def _split(self, batch) -> tuple[dict, torch.Tensor]:
        """(the model's keyword arguments, labels [n]) of `batch`."""
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise ValueError(f"batch: expected the labels under key {self.label_key!r} (label_key), got keys "
                                 f"{list(batch)}")
            return {k: v for k, v in batch.items() if k != self.label_key}, batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            return dict(zip(("input_ids", "attention_mask"), batch[:-1])), batch[-1]
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"batch: expected a mapping with {self.label_key!r} or a tuple (input_ids[, attention_mask], "
                         f"labels), got {got}")

    def inputs(self, batch):
        return self._split(batch)[0]

    def output(self, outputs, batch):
        return super().output(_logits(outputs), (None, self._split(batch)[1]))  # the parent reads (inputs, labels)

    def out_to_loss(self, outputs, batch):
        return super().out_to_loss(_logits(outputs), (None, self._split(batch)[1]))

    def loss(self, outputs, batch):
        return super().loss(_logits(outputs), (None, self._split(batch)[1]))

    def config(self) -> dict:
        return {"name": self.name, "label_key": self.label_key}


def _embeddings(outputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image [n, d], text [n, d], the model's logit scale or None) of a contrastive model's outputs."""
    if hasattr(outputs, "image_embeds") and hasattr(outputs, "text_embeds"):  # Hugging Face CLIPOutput
        return outputs.image_embeds, outputs.text_embeds, None
    if (isinstance(outputs, (tuple, list)) and len(outputs) in (2, 3)
            and all(isinstance(t, torch.Tensor) for t in outputs)):
        return outputs[0], outputs[1], outputs[2] if len(outputs) == 3 else None
    raise ValueError(f"outputs: expected (image_embeddings [n, d], text_embeddings [n, d][, logit_scale]) or an object "
                     f"with .image_embeds and .text_embeds, got {type(outputs).__name__}")


class ContrastiveImageText(Task):
    """CLIP-style image–text pairs: the model maps (images, texts) to (image_embeddings [n, d], text_embeddings [n, d]).

    Equivalent to f_i = a_i + b_i and Q_i = 1 − (σ(a_i) + σ(b_i)) / 2, where, over R reference pairs (U_j, V_j),
    with s_i = ⟨u_i, v_i⟩, a_i = −log Σ_j exp(scale·(⟨u_i, V_j⟩ − s_i)), b_i = −log Σ_j exp(scale·(⟨U_j, v_i⟩ − s_i)):
    the log-odds of matching image to text and text to image against R negatives (TRAK, Sec. 5.1); the loss is the
    mean of the two cross-entropies, (softplus(−a_i) + softplus(−b_i)) / 2, CLIP's loss against the reference. The reference, the
    model's embeddings of a seeded sample of training pairs, stands in for the batch so that f_i depends on pair i
    alone; it belongs to one checkpoint, so methods call `prepare` again for each. Batches: tuples (images, texts),
    fed as model(images, texts), or mappings of keyword arguments.
    Unlike traker's CLIPModelOutput, which draws 300 stored embeddings afresh per example and call (weights ∝ index),
    the reference is fixed, so f is deterministic; and Q uses f's scale and reference, not the model's logit scale
    over the current batch (traker's f is unscaled: scale=1). As in traker, a pair may be among its own negatives.

    Args:
        reference_size: R, the number of training pairs drawn (all of them when fewer). seed: seed of the draw.
        scale: positive multiplier of the inner products, or None for the model's third output (open_clip's
            logit_scale.exp()).
    """

    name = "contrastive_image_text"

    def __init__(self, reference_size: int = 300, seed: int = 0, scale: float | None = 1.0):
        if isinstance(reference_size, bool) or not isinstance(reference_size, int) or reference_size < 1:
            raise ValueError(f"reference_size: expected a positive int, got {reference_size!r}")
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale: expected a positive number or None (the model's logit scale), got {scale!r}")
        self.reference_size, self.seed, self.scale = reference_size, int(seed), scale
        self.reference = None  # (image [R, d], text [R, d]), set by prepare

    def inputs(self, batch):
        if isinstance(batch, Mapping):
            return dict(batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return tuple(batch)
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"batch: expected (images, texts) or a mapping of the model's keyword arguments, got {got}")

    def prepare(self, model, train_batches) -> None:
        """Embed a seeded uniform sample of `reference_size` training pairs with `model`, as the reference.

        Equivalent to `self.reference = model(*sample)[:2]` under no_grad, where the sample keeps the examples with
        the smallest seeded uniform keys; only examples that can still enter it are embedded.

        Args:
            model: the nn.Module holding the checkpoint's weights.
            train_batches: iterable of training batches ((images, texts) or mappings).
        Raises: ValueError naming `train_batches` when it holds no example, `outputs` for unreadable model outputs.
        Determinism: the same seed, weights and order of examples give the same reference.
        """
        generator = torch.Generator().manual_seed(self.seed)
        keys, images, texts = torch.empty(0, dtype=torch.float64), None, None
        with torch.no_grad():
            for batch in train_batches:
                fresh = torch.rand(batch_size(batch), generator=generator, dtype=torch.float64)
                if keys.numel() == self.reference_size:
                    rows = (fresh < keys.max()).nonzero().flatten()
                else:
                    rows = torch.arange(fresh.numel())
                if rows.numel() == 0:
                    continue
                picked = pytree.tree_map(lambda t: t[rows.to(t.device)] if isinstance(t, torch.Tensor) else t, batch)
                args, kwargs = model_args(self.inputs, picked)
                u, v, _ = _embeddings(model(*args, **kwargs))
                keys = torch.cat([keys, fresh[rows]])
                images = u if images is None else torch.cat([images, u])
                texts = v if texts is None else torch.cat([texts, v])
                keep = keys.argsort()[:self.reference_size]
                keys, images, texts = keys[keep], images[keep.to(images.device)], texts[keep.to(texts.device)]
        if images is None:
            raise ValueError("train_batches: expected at least one example to draw the reference from, got none")
        self.reference = (images.detach(), texts.detach())

    def _log_odds(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [n], b [n]): image-to-text and text-to-image log-odds of each pair against the reference."""
        if self.reference is None:
            raise RuntimeError("ContrastiveImageText: no reference embeddings; call task.prepare(model, "
                               "train_batches) for this checkpoint first")
        u, v, model_scale = _embeddings(outputs)
        ref_u, ref_v = (t.to(device=u.device, dtype=u.dtype) for t in self.reference)
        if u.shape[-1] != ref_u.shape[-1] or v.shape[-1] != ref_v.shape[-1]:
            raise ValueError(f"outputs: expected embeddings of dimension d == {ref_u.shape[-1]} (from the reference), "
                             f"got image {list(u.shape)} and text {list(v.shape)}")
        if self.scale is None and model_scale is None:
            raise ValueError("outputs: scale=None needs the model's logit scale as a third output, got two")
        scale = self.scale if self.scale is not None else model_scale
        own = (u * v).sum(-1, keepdim=True)
        a = -torch.logsumexp(scale * (u @ ref_v.T - own), dim=-1)
        b = -torch.logsumexp(scale * (v @ ref_u.T - own), dim=-1)
        return a, b

    def output(self, outputs, batch):
        a, b = self._log_odds(outputs)
        return a + b

    def out_to_loss(self, outputs, batch):
        a, b = self._log_odds(outputs)
        return 1.0 - (torch.sigmoid(a) + torch.sigmoid(b)) / 2

    def loss(self, outputs, batch):
        a, b = self._log_odds(outputs)
        return (torch.nn.functional.softplus(-a) + torch.nn.functional.softplus(-b)) / 2

    def config(self) -> dict:
        return {"name": self.name, "reference_size": self.reference_size, "seed": self.seed, "scale": self.scale}


_LM_FIELDS = ("input_ids", "attention_mask", "labels")


def _lm_fields(batch) -> dict:
    """{"input_ids": [n, T], optionally "attention_mask" and "labels" [n, T], ...} of a language-modelling batch."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return dict(zip(_LM_FIELDS, batch))
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return dict(batch)
    got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"batch: expected input_ids [n, T], a tuple (input_ids[, attention_mask[, labels]]) or a mapping "
                     f"with 'input_ids', got {got}")


class LanguageModeling(Task):
    """Causal language modelling: the model maps token ids [n, T] to next-token logits [n, T, V] (or `.logits`).

    Equivalent to f = Σ_{t≥1} m_t · log softmax(logits[:, t−1])[labels[:, t]] (position t−1 predicts token t, so the
    first token is never scored) and Q = 1 − exp(f / Σ_t m_t), where m_t = (attention_mask[t] ≠ 0 and labels[t] ≠
    −100) and labels default to input_ids (Hugging Face's convention: unshifted, −100 ignored). Batches: input_ids
    [n, T] (fed as model(input_ids)), tuples (input_ids[, attention_mask[, labels]]) or mappings with "input_ids"
    (fed as keyword arguments, "labels" left out).
    Q: ∂loss/∂f is 1 for every example here (the summed token loss is −f), which would not reweight at all, and
    1 − p(sequence) is ≈ 1 for any realistic length; 1 − p̄ with p̄ the geometric-mean token probability is the
    sequence analogue of 1 − p_y (equal to it for one scored token), the Q of dattri's language-model TRAK examples.
    The loss is the summed token cross-entropy, −f.
    """

    name = "language_modeling"

    def inputs(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch
        return {k: v for k, v in _lm_fields(batch).items() if k != "labels"}

    def _token_log_probs(self, outputs, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each scored next token, 0 elsewhere [n, T−1]; which are scored [n, T−1] bool)."""
        fields = _lm_fields(batch)
        ids, logits = fields["input_ids"], _logits(outputs)
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"outputs: expected logits [n, T, V] with [n, T] == {list(ids.shape)} (input_ids), got "
                             f"{list(logits.shape)}")
        targets = fields.get("labels", ids)[:, 1:].long()
        scored = targets != -100
        if fields.get("attention_mask") is not None:
            scored = scored & (fields["attention_mask"][:, 1:] != 0)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(scored, logp, torch.zeros_like(logp)), scored

    def output(self, outputs, batch):
        return self._token_log_probs(outputs, batch)[0].sum(-1)

    def out_to_loss(self, outputs, batch):
        logp, scored = self._token_log_probs(outputs, batch)
        return 1.0 - torch.exp(logp.sum(-1) / scored.sum(-1).clamp_min(1))

    def loss(self, outputs, batch):
        return -self.output(outputs, batch)
