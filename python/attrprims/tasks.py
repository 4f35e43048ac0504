"""Tasks: what an attribution method attributes, for a kind of model and data.

A task says how a batch feeds the model (`inputs`), which scalar per example is attributed (`output`, TRAK's
model output function f) and TRAK's out-to-loss term (`out_to_loss`, the diagonal of Q: how much the loss moves
per unit of output). Methods call these three and nothing else, so a new kind of model needs only a new task:
subclass `Task` and override what differs. `config()` names the task and its options; feature stores record it
and refuse to mix features made under another task.
"""

from __future__ import annotations

import torch


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

    def config(self) -> dict:
        """JSON-serialisable identity of the task (its name and options)."""
        return {"name": self.name}

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
    other logits (the margin), and Q = 1 − p_y with p = softmax(logits).
    """

    name = "multiclass"

    def output(self, outputs, batch):
        y = _labels(batch)
        correct = outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        is_label = torch.arange(outputs.shape[-1], device=outputs.device) == y.unsqueeze(-1)  # vmap-safe one-hot
        others = outputs.masked_fill(is_label, float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def out_to_loss(self, outputs, batch):
        y = _labels(batch)
        return 1.0 - torch.softmax(outputs, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


class BinaryClassification(Task):
    """Binary classification with one logit per example ([n] or [n, 1]) and labels in {0, 1}.

    Equivalent to f = (2y − 1)·logit (the log-odds of the correct class, TRAK's margin for two classes) and
    Q = 1 − σ(f), one minus the probability of the correct class.
    """

    name = "binary"

    def output(self, outputs, batch):
        y = _labels(batch)
        logit = outputs.reshape(y.shape)
        return (2.0 * y.to(logit.dtype) - 1.0) * logit

    def out_to_loss(self, outputs, batch):
        return 1.0 - torch.sigmoid(self.output(outputs, batch))
