import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import build
from trainer.component import Gate
from trainer.config import ComponentSpec
from trainer.injectors import INJECTORS, ForEachInjector
from trainer.losses import LOSSES, loss_input_keys
from utils.schema import Problems


class TwoHeads(nn.Module):
    def forward(self, a, b=None):
        return {"sum": a + (0 if b is None else b), "prod": a * (1 if b is None else b)}


def test_generator_positional_keyword_and_dict_outputs():
    nets = {"g": TwoHeads()}
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    inj = build(
        INJECTORS,
        {"type": "generator", "generator": "g", "in": ["x", "y"], "out": ["sum"]},
        {"networks": nets},
    )
    assert torch.equal(inj({"x": a, "y": b})["sum"], a + b)
    inj = build(
        INJECTORS,
        {"type": "generator", "generator": "g", "in": {"b": "y", "a": "x"}, "out": ["prod", "sum"]},
        {"networks": nets},
    )
    out = inj({"x": a, "y": b})
    assert torch.equal(out["prod"], a * b) and torch.equal(out["sum"], a + b)
    inj = build(
        INJECTORS,
        {"type": "generator", "generator": "g", "in": "x", "out": "nope"},
        {"networks": nets},
    )
    with pytest.raises(KeyError, match="out asks for \\['nope'\\]"):
        inj({"x": a})


def test_generator_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    inj = build(
        INJECTORS,
        {"type": "generator", "generator": "p", "in": "x", "out": ["a", "b"]},
        {"networks": {"p": Pair()}},
    )
    out = inj({"x": torch.ones(2)})
    assert out["a"].tolist() == [2, 2] and out["b"].tolist() == [2, 2]


def test_for_each_over_tensor_dim1_and_list():
    class Square(nn.Module):
        def forward(self, x):
            return x**2

    inj = build(
        INJECTORS,
        {
            "type": "for_each",
            "subtype": "generator",
            "generator": "sq",
            "in": "cond",
            "out": "cond_sq",
        },
        {"networks": {"sq": Square()}},
    )
    cond = torch.arange(24.0).view(2, 3, 4)  # [B, N, T]
    assert torch.equal(inj({"cond": cond})["cond_sq"], cond**2)
    ragged = [torch.ones(2), torch.ones(3) * 2]
    out = inj({"cond": ragged})["cond_sq"]
    assert isinstance(out, list) and out[1].tolist() == [4, 4, 4]


def test_for_each_validates_subtype_options():
    problems = Problems()
    ForEachInjector.check_options(
        {"subtype": "generator", "generatr": "x"}, "steps.s.injectors.f", problems, None
    )
    assert "steps.s.injectors.f.generatr" in dict(problems.items)
    problems = Problems()
    ForEachInjector.check_options({"generator": "x"}, "p", problems, None)
    assert "p.subtype" in dict(problems.items)


def test_gates():
    gate = Gate(after=10, before=20, every=5)
    assert [s for s in range(30) if gate.open(s)] == [10, 15]
    inj = build(
        INJECTORS,
        {
            "type": "generator",
            "generator": "g",
            "in": "x",
            "out": "sum",
            "train": False,
            "after": 3,
        },
        {"networks": {"g": TwoHeads()}},
    )
    assert not inj.runs(5, training=True)
    assert inj.runs(5, training=False) and not inj.runs(2, training=False)


def test_losses_match_torch():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    logits, labels = torch.randn(4, 5, 7), torch.randint(0, 5, (4, 7))
    labels[0, 0] = -100
    state = {"a": a, "b": b, "logits": logits, "labels": labels, "direct": torch.tensor([1.0, 3.0])}
    assert build(LOSSES, {"type": "mse", "fake": "a", "real": "b"})(state) == F.mse_loss(a, b)
    assert build(LOSSES, {"type": "l1", "fake": "a", "real": "b"})(state) == F.l1_loss(a, b)
    assert build(LOSSES, {"type": "direct", "key": "direct"})(state) == 2.0
    ce = build(LOSSES, {"type": "cross_entropy", "logits": "logits", "labels": "labels"})
    assert torch.allclose(ce(state), F.cross_entropy(logits, labels))
    last = build(
        LOSSES,
        {
            "type": "cross_entropy",
            "logits": "lt",
            "labels": "labels",
            "class_dim": -1,
            "label_smoothing": 0.1,
        },
    )
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(last({**state, "lt": logits.transpose(1, 2)}), expected, atol=1e-6)


def test_loss_weight_and_state_keys():
    spec_cls = LOSSES.get("cross_entropy")
    spec = ComponentSpec("ce", "p", spec_cls, {"logits": "lg", "labels": "lb"}, {"weight": 0.5})
    assert loss_input_keys(spec) == ["lg", "lb"]
    loss = build(LOSSES, {"type": "mse", "fake": "a", "real": "b", "weight": 0.0})
    assert loss.weight == 0.0
