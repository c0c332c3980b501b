"""trainer/export.py: a run's checkpoint -> network file(s) + model card for inference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from helpers import TINY, make_trainer, write_checkpoint
from models import load_network
from models.audio.tts.synthesis import Synthesizer
from models.lora import load_adapted
from trainer.checkpoint import CheckpointManager
from trainer.export import main
from utils.errors import run_command
from utils.io import read_network_metadata, read_safetensors

LORA = {"rank": 2, "alpha": 4, "target": ["body.*", "head"]}
HISTORY = [
    [2, {"mel_stft": 3.0, "duration_ratio": 0.5}],
    [4, {"mel_stft": 2.0, "duration_ratio": 0.9}],
]


def logits(net: torch.nn.Module) -> torch.Tensor:
    """VALL-E's AR and NAR logits on fixed random inputs (TINY: 64 phonemes, 2 levels)."""
    g = torch.Generator().manual_seed(1)
    ph, pl = torch.randint(4, 40, (2, 7), generator=g), torch.tensor([7, 5])
    pr, ql = torch.randint(0, 16, (2, 2, 6), generator=g), torch.tensor([6, 3])
    codes, cl = torch.randint(0, 16, (2, 2, 9), generator=g), torch.tensor([9, 4])
    with torch.no_grad():
        ar = net.eval().ar_logits(ph, pl, pr, ql, codes[:, 0], cl)
        nar = net.nar_logits(ph, pl, pr, ql, codes, cl, torch.tensor([1, 1]))
    return torch.cat([ar.flatten(), nar.flatten()])


@pytest.fixture(scope="module")
def valle_run(tmp_path_factory):
    """A VALL-E run folder with EMA, steps 2 and 4, best.json naming step 2, evaluator history,
    samples of step 2 and config.yml; returns (run, {step: ema network})."""
    root = tmp_path_factory.mktemp("export")
    model = write_checkpoint(root / "src.safetensors")
    meta = read_network_metadata(root / "src.safetensors")
    extra = {k: meta[k] for k in ("phoneme_vocab", "phonemizer", "codec")}
    run = root / "valle_demo"
    manager = CheckpointManager(run)
    emas = {}
    for step in (2, 4):
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.01 * step)
        emas[step] = ema
        state = {"evaluator.tts": {"history": HISTORY[: step // 2]}}
        manager.save(step, {"valle": (model, "valle", TINY)}, state, {"valle": ema}, extra)
    best = {"metric": "eval/mel_stft", "mode": "min", "step": 2, "value": 3.0, "files": []}
    (run / "best.json").write_text(json.dumps(best))
    (run / "config.yml").write_text(yaml.safe_dump({"name": "valle_demo", "seed": 1}))
    samples = run / "samples" / "2"
    samples.mkdir(parents=True)
    for name in ("a.wav", "a_ref.wav", "b.wav", "b_ref.wav"):
        (samples / name).write_bytes(b"RIFF" + name.encode())
    return run, emas


def export(run, out, *extra):
    return run_command(main, ["--run", str(run), "--out", str(out), *map(str, extra)])


def test_valle_best_ema_fp32_loads_for_synthesis_with_the_same_outputs(valle_run, tmp_path):
    run, emas = valle_run
    out = tmp_path / "exported"
    assert export(run, out) == 0
    exported = out / "valle.safetensors"
    synth = Synthesizer.from_checkpoint(exported, codec_options={"pretrained": False})
    for name, t in emas[2].state_dict().items():  # step 2 (best.json), EMA weights, exactly
        assert torch.equal(synth.model.state_dict()[name], t), name
    assert torch.equal(logits(synth.model), logits(emas[2]))
    source = read_network_metadata(run / "models" / "2_valle_ema.safetensors")
    meta = read_network_metadata(exported)
    assert {k: v for k, v in meta.items() if k != "sha256"} == {
        **{k: v for k, v in source.items() if k != "sha256"},
        "dtype": "float32",
        "exported_from": str(run / "models" / "2_valle_ema.safetensors"),
    }
    card = (out / "README.md").read_text()
    assert "# valle of valle_demo, step 2" in card
    assert "| step | 2: best eval/mel_stft 3 (min) in best.json |" in card
    assert "| weights | EMA; fp32; no LoRA |" in card
    assert "| phoneme vocabulary |" in card and '"name": "mel_rvq"' in card
    # the state of step 2 holds one evaluation: first = last
    assert (
        "| figure | step 2 (first) | step 2 (last) |" in card
        and "| eval/mel_stft | 3 | 3 |" in card
    )
    assert f"python synthesize.py --model {exported}" in card
    assert f"--prompt {out / 'samples' / 'a_ref.wav'}" in card
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "a.wav",
        "a_ref.wav",
        "b.wav",
        "b_ref.wav",
    ]
    assert (out / "config.yml").read_text() == (run / "config.yml").read_text()
    assert "name: valle_demo" in card  # the resolved config


def test_bf16_is_half_the_size_and_close(valle_run, tmp_path, capsys):
    run, emas = valle_run
    assert export(run, tmp_path / "a", "--step", "latest", "--weights", "raw") == 0
    assert export(run, tmp_path / "b", "--step", "latest", "--dtype", "bf16") == 0
    full, half = tmp_path / "a" / "valle.safetensors", tmp_path / "b" / "valle.safetensors"
    tensors, meta = read_safetensors(half)
    assert meta["dtype"] == "bfloat16" and all(
        t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point()
    )
    assert half.stat().st_size < 0.6 * full.stat().st_size
    synth = Synthesizer.from_checkpoint(half, codec_options={"pretrained": False})
    assert all(p.dtype == torch.float32 for p in synth.model.parameters())  # cast back on load
    assert torch.allclose(logits(synth.model), logits(emas[4]), atol=0.05, rtol=0.05)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "| step | 4: latest intact checkpoint |" in card
    assert "| eval/mel_stft | 3 | 2 |" in card and "step 4 (last)" in card
    assert "weights | EMA; bf16" in card and "bfloat16 (loaded as float32)" in card
    assert "The run wrote no samples" not in card  # step 2's samples: the nearest before 4
    raw = (tmp_path / "a" / "README.md").read_text()
    assert "| weights | raw (no EMA); fp32; no LoRA |" in raw


def test_lora_merge_equals_the_adapted_network_and_separate_keeps_both(tmp_path):
    sections = dict(networks={"mlp": {"lora": LORA}}, train={"niter": 4, "ema_rate": 0.5})
    make_trainer(tmp_path, **sections).train()
    run = tmp_path / "toy"
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    adapted, _ = load_adapted(run / "models" / "4_mlp_ema_lora.safetensors", merge=False)
    expected = adapted.eval()(x)

    assert export(run, tmp_path / "merged", "--pth") == 0
    merged = load_network(tmp_path / "merged" / "mlp.safetensors").eval()
    assert torch.allclose(merged(x), expected, atol=1e-5)
    meta = read_network_metadata(tmp_path / "merged" / "mlp.safetensors")
    assert json.loads(meta["lora_merged"])["rank"] == 2 and meta["ema"] == "true"
    pth = torch.load(tmp_path / "merged" / "mlp.pth", weights_only=True)
    assert set(pth) == set(merged.state_dict())  # the original key names, no .base.
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "LoRA adapters merged into the base (4_mlp_ema_lora.safetensors)" in card

    out = tmp_path / "separate"
    assert export(run, out, "--lora", "separate") == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "mlp_base.safetensors",
        "mlp_lora.safetensors",
    ]
    again, _ = load_adapted(out / "mlp_lora.safetensors", base=out / "mlp_base.safetensors")
    assert torch.allclose(again.eval()(x), expected, atol=1e-5)
    assert (
        "kept apart: mlp_lora.safetensors on the base mlp_base.safetensors"
        in (out / "README.md").read_text()
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_trainer(root, train={"niter": 4}, logger={"save_checkpoint_freq": 2}).train()
    return root / "toy"


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--step", "3"], 5, "has no checkpoint of step 3; it has steps 2, 4"),
        (
            ["--net", "mpl"],
            2,
            "--net 'mpl': checkpoint 4 has no such network (did you mean 'mlp'?)",
        ),
        (["--weights", "ema"], 2, "network 'mlp' has no EMA copy at step 4"),
        (["--step", "last"], 2, "give best, latest or a step number"),
    ],
)
def test_errors(toy_run, tmp_path, capsys, args, code, says):
    assert export(toy_run, tmp_path / "out", *args) == code
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_no_checkpoint_and_non_empty_out(toy_run, tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert export(tmp_path / "empty_run", tmp_path / "out") == 5
    assert "has no checkpoint" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert export(toy_run, tmp_path / "full") == 2
    assert "exists and is not empty; choose another folder or --force" in capsys.readouterr().err
    assert export(toy_run, tmp_path / "full", "--force") == 0
    card = (tmp_path / "full" / "README.md").read_text()
    assert "| step | 4: latest intact checkpoint (the run has no best.json) |" in card
    assert "No evaluator history" in card and "from models import load_network" in card
