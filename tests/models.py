"""Small float64 models covering every layer the layer path supports (and some it does not), batches, outputs."""

import torch
import torch.nn.functional as F
from torch import nn


def margin(outputs, batch):
    """Classification margin: logit of the label minus logsumexp of the other logits, per example."""
    y = batch[1]
    correct = outputs.gather(1, y[:, None])[:, 0]
    others = outputs.scatter(1, y[:, None], float("-inf"))
    return correct - others.logsumexp(1)


def sequence_log_prob(outputs, batch):
    """Sum over tokens of log p(label token): language-model output per example."""
    return outputs.log_softmax(-1).gather(-1, batch[1][..., None])[..., 0].sum(-1)


def mlp(bias=True):
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(inplace=True),
                         nn.Linear(6, 3, bias=bias))


def cnn():
    """Conv2d (padding, stride, groups, no bias), BatchNorm2d/1d in eval mode, GroupNorm, in-place ReLU."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), nn.GroupNorm(2, 6), nn.Flatten(), nn.Linear(24, 5),
        nn.BatchNorm1d(5), nn.Linear(5, 3))


class TinyLM(nn.Module):
    """Embedding with padding_idx, a learned positional parameter (not a supported layer), one pre-norm
    attention block of Linear layers over tokens, LayerNorm, RMSNorm, and a head tied to the embedding."""

    def __init__(self, vocab=11, width=8, length=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(length, width) * 0.1)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width, bias=False)
        self.norm2 = nn.RMSNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids) + self.position[: ids.shape[1]]
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return self.head(h)


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention uses its out_proj Linear's weight without calling it: the layer path must notice."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0].mean(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return self.a(x) * self.b(z)


def setting(name, n, seed=0):
    """(model, output_fn, batch, model_args) with float64 parameters and random inputs of batch size n."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name in ("mlp", "mlp_nobias"):
        model, batch = mlp(name == "mlp"), (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))
        out = margin
    elif name == "cnn":
        model, batch = cnn(), (torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
        out = margin
    elif name in ("lm", "lm_len1"):
        length = 1 if name == "lm_len1" else 5
        model = TinyLM()
        batch = (torch.randint(0, 11, (n, length), generator=g), torch.randint(0, 11, (n, length), generator=g))
        out = sequence_log_prob
    elif name == "attention":
        model = AttentionClassifier()
        batch = (torch.randn(n, 4, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
        out = margin
    else:
        raise KeyError(name)
    model = model.double().eval()
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=g)
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    return model, out, batch, lambda example: ((example[0],), {})
