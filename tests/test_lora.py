"""LoRA (models/lora.py, trainer/lora.py): adapters, merge, validation, training, checkpoints,
resume and synthesis with adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import SYNTH_OPTS, make_experiment, make_trainer, write_checkpoint, write_prompt
from models import load_network
from models.audio.tts.gpt2 import Conv1D
from models.audio.tts.synthesis import Synthesizer
from models.audio.tts.unified_voice2 import UnifiedVoice2
from models.audio.tts.valle import VALLE
from models.lora import (
    LoraLayer,
    LoraOptions,
    adapter_state,
    apply_lora,
    lora_layers,
    merge_lora,
    requires_grad_,
    save_adapters,
)
from models.lora import (
    main as lora_main,
)
from utils.errors import CheckpointError, run_command
from utils.io import file_sha256, load_module, read_safetensors, save_network
from utils.schema import ConfigError

LORA = {"rank": 2, "alpha": 4, "target": ["body.*", "head"]}


def randomise_adapters(net: nn.Module, seed: int = 0) -> None:
    """As if trained: B is no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("kind", [nn.Linear, Conv1D])
def test_fresh_adapter_is_the_identity_and_merge_equals_the_adapted_layer(kind):
    torch.manual_seed(0)  # the base is made here: its values do not depend on the test order
    base = kind(6, 5)
    x = torch.randn(3, 4, 6)
    plain = base(x)
    layer = LoraLayer(base, rank=2, alpha=4.0)
    assert layer.lora_a.shape == (2, 6) and layer.lora_b.shape == (5, 2)
    assert torch.equal(layer(x), plain)  # B starts at zero
    randomise_adapters(nn.ModuleDict({"l": layer}))
    adapted = layer(x)
    assert not torch.allclose(adapted, plain)
    weight = base.weight.clone()
    layer.merge()
    # merged: one matmul instead of two, so equal up to float rounding
    assert torch.allclose(base(x), adapted, atol=1e-6)
    assert torch.allclose(layer(x), adapted, atol=1e-6)
    layer.unmerge()
    assert torch.allclose(base.weight, weight, atol=1e-6)
    assert torch.allclose(layer(x), adapted, atol=1e-6)


def test_requires_grad_trains_only_the_adapters():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    apply_lora(net, LoraOptions(rank=1, target=["0"]))
    requires_grad_(net, True)  # as the trainer does between steps
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_a", "0.lora_b"]
    requires_grad_(net, False)
    assert not any(p.requires_grad for p in net.parameters())


# ----------------------------------------------------------------------------- merge
VALLE_TINY = dict(
    n_phonemes=20, codebook_size=16, n_levels=3, d_model=32, n_layers=2, n_heads=2, dropout=0.0
)
UV2_TINY = dict(
    layers=2,
    model_dim=32,
    heads=4,
    max_text_tokens=20,
    max_mel_tokens=30,
    max_conditioning_inputs=2,
    mel_length_compression=4,
    number_text_tokens=50,
    start_text_token=49,
    number_mel_codes=100,
    start_mel_token=98,
    stop_mel_token=99,
)


def valle_outputs(net: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ph, pl = torch.randint(3, 20, (2, 7), generator=g), torch.tensor([7, 5])
    pr, ql = torch.randint(0, 16, (2, 3, 6), generator=g), torch.tensor([6, 3])
    codes, cl = torch.randint(0, 16, (2, 3, 9), generator=g), torch.tensor([9, 4])
    ar = net.ar_logits(ph, pl, pr, ql, codes[:, 0], cl)
    nar = net.nar_logits(ph, pl, pr, ql, codes, cl, torch.tensor([1, 2]))
    return torch.cat([ar.flatten(), nar.flatten()])


def uv2_outputs(net: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 2, 80, 12, generator=g)
    text = torch.randint(1, 49, (2, 9), generator=g)
    codes = torch.randint(0, 98, (2, 12), generator=g)
    loss_text, loss_mel, logits = net(
        cond, text, torch.tensor([9, 5]), codes, torch.tensor([41, 17])
    )
    return torch.cat([loss_text[None], loss_mel[None], logits.flatten()])


@pytest.mark.parametrize(
    "cls, kwargs, which, outputs, adapted",
    [
        (VALLE, VALLE_TINY, "valle", valle_outputs, "trunks.0.blocks.1.mlp.2"),
        (UnifiedVoice2, UV2_TINY, "unified_voice2", uv2_outputs, "gpt.h.1.attn.c_attn"),
    ],
)
def test_merged_network_gives_the_adapted_outputs(tmp_path, cls, kwargs, which, outputs, adapted):
    torch.manual_seed(0)
    net = cls(**kwargs).eval()
    base = tmp_path / "base.safetensors"
    save_network(net, base, which_model=which, kwargs=kwargs, extra={"codec": "{}"})
    with torch.no_grad():
        before = outputs(net)
    names = apply_lora(net, LoraOptions(rank=4, alpha=8))  # the model's default targets
    assert adapted in names and len(names) == 8  # attention + MLP projections of 2 blocks
    randomise_adapters(net)
    with torch.no_grad():
        expected = outputs(net)
    assert not torch.allclose(expected, before, atol=1e-3)  # the adapters matter
    lora = tmp_path / "x_lora.safetensors"
    options = LoraOptions(rank=4, alpha=8)
    save_adapters(
        net,
        lora,
        which_model=which,
        kwargs=kwargs,
        options=options,
        base=base,
        base_sha256=file_sha256(base),
        extra={"codec": "{}"},
    )
    merged = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", str(base), "--lora", str(lora), "--out", str(merged)]
    assert run_command(lora_main, argv) == 0
    plain = load_network(merged).eval()  # a plain network file, the original names
    assert not lora_layers(plain)
    with torch.no_grad():
        assert torch.allclose(outputs(plain), expected, atol=1e-5)
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["codec"] == "{}" and f.metadata()["merged_lora"] == str(lora)
    # merge_lora on the live network: the same outputs, the original parameter names
    with torch.no_grad():
        assert torch.allclose(outputs(merge_lora(net)), expected, atol=1e-5)
    assert set(net.state_dict()) == set(cls(**kwargs).state_dict())


# ----------------------------------------------------------------------------- validation
def test_lora_options_are_checked_at_start_up(tmp_path):
    bad = {"rank": 0, "alpha": 0, "dropout": 1.0, "target": ["body.*", "*.attn.*", "body.1"]}
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, networks={"mlp": {"lora": bad}})
    msg = str(e.value)
    assert "networks.mlp.lora.rank: must be >= 1, got 0" in msg
    assert "networks.mlp.lora.alpha: must be > 0, got 0.0" in msg
    assert "networks.mlp.lora.dropout: must be >= 0 and < 1, got 1.0" in msg
    with pytest.raises(ConfigError) as e:
        make_experiment(tmp_path, networks={"mlp": {"lora": {"target": bad["target"]}}})
    msg = str(e.value)
    assert "networks.mlp.lora.target[1]: '*.attn.*' matches no module" in msg
    assert "body.0" in msg and "head" in msg  # real names to choose from
    assert "target[2]: 'body.1' matches only modules LoRA cannot adapt (body.1 (LayerNorm))" in msg
    assert "target[0]" not in msg
    # toy_mlp has no default targets; a network that does not train; deepspeed
    with pytest.raises(ConfigError) as e:
        make_experiment(
            tmp_path, networks={"mlp": {"lora": {}, "trainable": False}}, engine="deepspeed"
        )
    msg = str(e.value)
    assert "networks.mlp.lora.target: required: 'toy_mlp' declares no default lora_targets" in msg
    assert "networks.mlp.lora: is set but trainable is false" in msg
    assert "networks.mlp.lora: is not supported with engine: deepspeed" in msg
    assert make_experiment(tmp_path, networks={"mlp": {"lora": LORA}}).networks["mlp"].lora == (
        LoraOptions(rank=2, alpha=4.0, dropout=0.0, target=["body.*", "head"])
    )


# ----------------------------------------------------------------------------- training
def base_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if ".lora_" not in k}


def test_training_moves_only_the_adapters_and_saves_only_them(tmp_path, capsys):
    torch.manual_seed(3)
    pretrained = make_trainer(tmp_path / "pre").raw_networks["mlp"]
    base = tmp_path / "base.safetensors"
    save_network(pretrained, base, which_model="toy_mlp", kwargs={"hidden": 32})
    trainer = make_trainer(
        tmp_path,
        networks={"mlp": {"lora": LORA}},
        path={"pretrain_model_mlp": str(base)},
        train={"niter": 6, "ema_rate": 0.5},
    )
    net = trainer.raw_networks["mlp"]
    start = base_tensors(net)
    file_weights, _ = read_safetensors(base)
    for name, t in start.items():  # the adapters sit on the pretrained weights
        assert torch.equal(t, file_weights[name.replace(".base.", ".")]), name
    optimized = {id(p) for g in trainer.steps["fit"].optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in adapter_state(net).values()}
    trainer.train()

    for name, t in base_tensors(net).items():
        assert torch.equal(t, start[name]), f"{name} moved"  # bit-identical
    assert all(layer.lora_b.abs().sum() > 0 for layer in lora_layers(net).values())
    out = capsys.readouterr().out
    assert "networks.mlp: LoRA rank 2, alpha 4 on 3 modules" in out
    assert "trainable parameters 296 of 2,156 (13.73%)" in out

    # the checkpoint holds the adapters and names the base; the EMA shares the base
    models = trainer.checkpoints.models_dir
    assert sorted(p.name for p in models.iterdir()) == [
        "6_mlp_ema_lora.safetensors",
        "6_mlp_lora.safetensors",
    ]
    tensors, meta = read_safetensors(models / "6_mlp_lora.safetensors")
    assert set(tensors) == set(adapter_state(net))
    assert meta["base"] == str(base.resolve()) and meta["base_sha256"] == file_sha256(base)
    assert json.loads(meta["lora"]) == {
        "rank": 2,
        "alpha": 4.0,
        "dropout": 0.0,
        "target": LORA["target"],
    }
    assert meta["which_model"] == "toy_mlp" and json.loads(meta["kwargs"])["hidden"] == 32
    ema = trainer.ema["mlp"].module
    assert ema.body[0].base.weight is net.body[0].base.weight  # not a second copy
    ema_tensors, _ = read_safetensors(models / "6_mlp_ema_lora.safetensors")
    assert not torch.equal(ema_tensors["head.lora_b"], tensors["head.lora_b"])
    assert (models / "6_mlp_lora.safetensors").stat().st_size < base.stat().st_size / 3
    with pytest.raises(ConfigError, match="holds LoRA adapters, not a network"):
        make_experiment(
            tmp_path, path={"pretrain_model_mlp": str(models / "6_mlp_lora.safetensors")}
        )


def test_resume_is_exact_and_refuses_a_changed_base(tmp_path):
    sections = dict(
        networks={"mlp": {"lora": LORA}},
        train={"niter": 4, "ema_rate": 0.5},
        logger={"save_checkpoint_freq": 2},
    )
    full = make_trainer(tmp_path / "a", **sections)
    full.train()
    base = tmp_path / "a" / "toy" / "models" / "mlp_base.safetensors"  # no pretrain: written
    assert base.is_file()
    state = tmp_path / "a" / "toy" / "training_state" / "2.state"
    resumed = make_trainer(tmp_path / "a", **sections, path={"resume_state": str(state)})
    assert resumed.step == 2
    resumed.train()
    for name, t in resumed.raw_networks["mlp"].state_dict().items():
        assert torch.equal(t, full.raw_networks["mlp"].state_dict()[name]), name
    for name, t in resumed.ema["mlp"].module.state_dict().items():  # the EMA continued too
        assert torch.equal(t, full.ema["mlp"].module.state_dict()[name]), name
    without = {**sections, "networks": {"mlp": {"kwargs": {"hidden": 32}}}}
    with pytest.raises(CheckpointError, match="saved only LoRA adapters of mlp"):
        make_trainer(tmp_path / "a", **without, path={"resume_state": str(state)})

    load = load_network(base)  # the base file itself is a plain network
    with torch.no_grad():
        load.head.weight.add_(1e-3)
    save_network(load, base, which_model="toy_mlp", kwargs={"hidden": 32})
    with pytest.raises(CheckpointError, match="is not the base the adapters of .* trained on"):
        make_trainer(tmp_path / "a", **sections, path={"resume_state": str(state)})


def test_resuming_with_and_without_lora_says_what_the_checkpoint_holds(tmp_path):
    plain = make_trainer(tmp_path, train={"niter": 2})
    plain.train()
    state = {"resume_state": str(tmp_path / "toy" / "training_state" / "2.state")}
    with pytest.raises(CheckpointError, match="saved mlp whole .* trained without LoRA"):
        make_trainer(tmp_path, networks={"mlp": {"lora": LORA}}, path=state)


# ----------------------------------------------------------------------------- synthesis
def test_synthesizer_merges_adapters_trained_on_the_model(tmp_path):
    base = tmp_path / "valle.safetensors"
    model = write_checkpoint(base)
    apply_lora(model, LoraOptions(rank=2))
    randomise_adapters(model)
    _, meta = read_safetensors(base)
    lora = tmp_path / "10_valle_lora.safetensors"
    extra = {k: meta[k] for k in ("phoneme_vocab", "phonemizer", "codec")}
    save_adapters(
        model,
        lora,
        which_model="valle",
        kwargs=json.loads(meta["kwargs"]),
        options=LoraOptions(rank=2),
        base=base,
        base_sha256=file_sha256(base),
        extra=extra,
    )
    synth = Synthesizer.from_checkpoint(base, codec_options={"pretrained": False}, lora=lora)
    merged = merge_lora(model).state_dict()
    for name, t in synth.model.state_dict().items():
        assert torch.allclose(t, merged[name], atol=1e-6), name
    prompt = synth.encode_prompt(write_prompt(tmp_path / "ref.wav"), seconds=1.0)
    wavs = synth.synthesize(["the cat sat down"], prompt, max_duration=0.2, seed=0, **SYNTH_OPTS)
    assert wavs[0].numel() > 0
    other = tmp_path / "other.safetensors"
    write_checkpoint(other, phonemizer=None)  # same weights, other metadata: another file
    with pytest.raises(CheckpointError, match="is not the base"):
        Synthesizer.from_checkpoint(other, codec_options={"pretrained": False}, lora=lora)
    with pytest.raises(CheckpointError, match="holds LoRA adapters, not a whole network"):
        Synthesizer.from_checkpoint(lora)
    fresh = VALLE(**json.loads(meta["kwargs"]))
    load_module(fresh, base)  # the base itself is untouched


def test_run_summary_gives_synthesize_the_base_and_the_adapters(tmp_path):
    from trainer.run_summary import _model_arguments
    from utils.io import file_sha256, save_network

    net = nn.Sequential(nn.Linear(4, 4))
    base = tmp_path / "base.safetensors"
    save_network(net, base, which_model="x", kwargs={})
    options = LoraOptions(rank=1, target=["0"])
    apply_lora(net, options)
    adapter = tmp_path / "models" / "20_net_ema_lora.safetensors"
    adapter.parent.mkdir()
    save_adapters(
        net,
        adapter,
        which_model="x",
        kwargs={},
        options=options,
        base=base,
        base_sha256=file_sha256(base),
    )
    parts = _model_arguments(adapter).split()  # e.g. base.safetensors --lora 20_..._lora...
    assert len(parts) == 3 and parts[1] == "--lora"
    assert parts[0].endswith("base.safetensors") and parts[2].endswith(adapter.name)
    plain = tmp_path / "models" / "20_net_ema.safetensors"
    assert "--lora" not in _model_arguments(plain)
