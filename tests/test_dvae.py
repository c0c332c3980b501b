"""lucidrains_dvae (DLAS's DiscreteVAE) and the discrete_token injector.

Golden values: shared/golden/tortoise beside the repository (made by the original DLAS code; see
scripts/golden_dvae_mel.py, which prints the same comparisons as a table).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import models.audio.tts  # noqa: F401 - registers lucidrains_dvae
from helpers import REPO, build_from_yaml, free_port, load_script, make_trainer
from models import build_network
from models.audio.tts.lucidrains_dvae import Quantize, code_usage
from trainer.injectors import INJECTORS, Injector
from trainer.injectors.dvae import DiscreteTokenInjector
from utils.errors import CheckpointError
from utils.io import load_module
from utils.schema import ConfigError

GOLDEN = REPO.parent / "shared" / "golden" / "tortoise"  # beside the repository

golden = load_script("golden_dvae_mel")

TINY = json.loads((GOLDEN / "dvae_tiny.json").read_text())["kwargs"]
# networks.dvae.kwargs of DLAS's train_diffusion_vocoder_22k_level.yml (the seed's dvae_config)
SEED = dict(
    channels=80,
    codebook_dim=512,
    hidden_dim=512,
    kernel_size=3,
    num_layers=2,
    num_resnet_blocks=3,
    num_tokens=8192,
    positional_dims=1,
    use_transposed_convs=False,
)


def tiny(**overrides: Any) -> torch.nn.Module:
    return build_network("lucidrains_dvae", {**TINY, **overrides})


# ----------------------------------------------------------------------------- the network
def test_seed_config_has_the_keys_and_shapes_of_dvae_pth():
    with torch.device("meta"):
        net = build_network("lucidrains_dvae", SEED)
    rows = [
        line.split("\t")
        for line in (GOLDEN / "dvae_seed_keys.tsv").read_text().splitlines()
        if not line.startswith("#")
    ]
    want = [(key, json.loads(shape)) for key, shape, *_ in rows]
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == want
    assert {k for k, _ in net.named_buffers()} == {
        "codebook.embed",
        "codebook.cluster_size",
        "codebook.embed_avg",
    }
    assert sum(p.numel() for p in net.parameters()) == 51_567_184


def test_golden_tiny_dvae_outputs():
    rows = golden.dvae_rows(GOLDEN)
    assert [r.name for r in rows if r.name.startswith("codes")] == ["codes", "codes36"]
    bad = [r for r in rows if not r.ok]
    assert not bad, golden.table(rows)


def test_strict_load_rejects_another_config():
    with pytest.raises(CheckpointError, match="codebook.embed"):
        load_module(tiny(codebook_dim=16), GOLDEN / "dvae_tiny.pth", strict=True)


@pytest.mark.parametrize("frames,codes", [(1, 1), (4, 1), (5, 2), (8, 2), (37, 10), (172, 43)])
def test_one_code_per_four_frames(frames, codes):
    assert tiny().get_codebook_indices(torch.randn(2, 80, frames)).shape == (2, codes)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"positional_dims": 2}, "positional_dims must be 1"),
        ({"use_lr_quantizer": True}, "use_lr_quantizer"),
        ({"lr_quantizer_args": {"decay": 0.8}}, "use_lr_quantizer"),
    ],
)
def test_unsupported_options_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_variants_build_and_run():
    """Transposed convs, encoder GroupNorm, silu, smooth L1, normalisation, no res blocks."""
    net = tiny(
        use_transposed_convs=True,
        kernel_size=4,
        encoder_norm=True,
        activation="silu",
        smooth_l1_loss=True,
        num_resnet_blocks=0,
        normalization=[[0.5] * 80, [2.0] * 80],
        record_codes=True,
    )
    recon, commitment, out = net(torch.randn(2, 80, 16))
    assert recon.shape == out.shape == (2, 80, 16) and commitment.ndim == 0
    assert int(net.code_counts.sum()) == 2 * 4 and "code_counts" not in net.state_dict()


def test_training_lowers_the_loss_and_moves_the_codebook():
    torch.manual_seed(0)
    net = tiny(num_tokens=16, codebook_dim=8)
    # log-mel-like: a per-channel level plus moving harmonics, a little noise
    c, t = torch.arange(80.0)[None, :, None], torch.arange(32.0)[None, None, :]
    phase = torch.rand(4, 1, 1) * 6
    mels = -6 + 2 * torch.sin(c / 9 + t / 5 + phase) + 0.1 * torch.randn(4, 80, 32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    embed0 = net.codebook.embed.clone()
    net.eval()
    with torch.no_grad():
        net(mels)
    assert torch.equal(net.codebook.embed, embed0)  # eval: no EMA update
    net.train()
    losses = []
    for _ in range(30):
        recon, commitment, _ = net(mels)
        loss = recon.mean() + 0.25 * commitment
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(recon.mean().detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.allclose(net.codebook.embed, embed0)
    assert net.codebook.cluster_size.sum() > 0
    # the EMA relation: embed = embed_avg / smoothed cluster size
    cs = net.codebook.cluster_size
    smoothed = (cs + 1e-5) / (cs.sum() + 16 * 1e-5) * cs.sum()
    assert torch.allclose(net.codebook.embed, net.codebook.embed_avg / smoothed, atol=1e-5)
    assert net.encoder[0][0].weight.grad is not None  # straight-through reaches the encoder


# ----------------------------------------------------------------------------- dead codes
def far_quantiser(n: int = 16, dim: int = 4, threshold: float = 0.0) -> Quantize:
    """A quantiser whose codebook lies far from N(0, 1) data: every vector picks the same code
    (the column nearest the origin)."""
    q = Quantize(dim, n, dead_code_threshold=threshold)
    far = 20 + torch.rand(dim, n) * 10  # columns at distance 40..60 from the origin
    q.embed.copy_(far)
    q.embed_avg.copy_(far)
    return q


def reference_ema(q: Quantize, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantiser's buffers after one train call, computed as before re-seeding existed."""
    embed, cluster_size, embed_avg = q.embed.clone(), q.cluster_size.clone(), q.embed_avg.clone()
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True)
    onehot = torch.nn.functional.one_hot((-d).max(1).indices, q.n_embed).type(flat.dtype)
    cluster_size.mul_(q.decay).add_(onehot.sum(0), alpha=1 - q.decay)
    embed_avg.mul_(q.decay).add_(flat.transpose(0, 1) @ onehot, alpha=1 - q.decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + q.eps) / (total + q.n_embed * q.eps) * total
    embed = embed_avg / smoothed.unsqueeze(0)
    return {"embed": embed, "cluster_size": cluster_size, "embed_avg": embed_avg}


def test_without_a_threshold_training_is_dlas_ema_bit_for_bit():
    torch.manual_seed(0)
    q = far_quantiser()  # dead codes everywhere: nothing may re-seed them
    assert q.dead_code_threshold == 0.0
    assert tiny().codebook.dead_code_threshold == 0.0  # off by default
    x = torch.randn(3, 20, 4)
    want = reference_ema(q, x.reshape(-1, 4))
    rng = torch.get_rng_state()
    q.train()(x)
    for name, value in want.items():
        assert torch.equal(getattr(q, name), value), name
    assert q.reseeded == 0 and torch.equal(torch.get_rng_state(), rng)  # no draw either


def test_dead_codes_are_reseeded_to_batch_vectors_after_one_training_call():
    torch.manual_seed(0)
    q = far_quantiser(threshold=1.0)
    x = torch.randn(256, 4)  # the one used code gets 0.01 * 256 = 2.56 >= 1 and stays
    _, codes, _ = q.train()(x)
    used = int(codes[0])
    assert torch.all(codes == used)  # only one code was picked
    dead = [j for j in range(16) if j != used]
    assert q.reseeded == 15
    columns = q.embed[:, dead].transpose(0, 1)  # [15, 4]
    # each is one of the batch's vectors, all different
    assert all((x == v).all(1).any() for v in columns)
    assert len({tuple(v.tolist()) for v in columns}) == 15
    assert torch.equal(q.embed_avg[:, dead], q.embed[:, dead] * 1.0)
    assert torch.equal(q.cluster_size[dead], torch.ones(15))
    assert q.cluster_size[used] == pytest.approx(2.56)
    assert not (x == q.embed[:, used]).all(1).any()  # the live code kept its EMA vector

    q2 = far_quantiser(n=8, threshold=2.0)  # fewer vectors than dead codes: repeats allowed
    q2.train()(torch.randn(3, 4))
    assert q2.reseeded == 8 and torch.equal(q2.cluster_size, torch.full((8,), 2.0))


def test_reseeding_uses_more_of_the_codebook_than_dlas_ema():
    def live_after_training(threshold: float) -> tuple[float, Quantize]:
        torch.manual_seed(0)
        q = far_quantiser(n=32, threshold=threshold).train()
        for _ in range(10):
            q(torch.randn(128, 4))
        _, codes, _ = q.eval()(torch.randn(2048, 4))
        return code_usage(torch.bincount(codes, minlength=32))["codes_used"], q

    without, q_off = live_after_training(0.0)
    with_reseed, q_on = live_after_training(1.0)
    assert without == 1 and with_reseed >= 24, (without, with_reseed)
    assert q_off.reseeded == 0 and q_on.reseeded >= 31


def test_codebook_usage_of_a_training_dvae():
    usage = {}
    for threshold in (0.0, 0.5):
        torch.manual_seed(0)
        net = tiny(num_tokens=32, codebook_dim=8, dead_code_threshold=threshold)
        far = 20 + torch.rand(8, 32) * 10
        net.codebook.embed.copy_(far)
        net.codebook.embed_avg.copy_(far)
        mels = torch.randn(4, 80, 64)  # 4 * 16 = 64 vectors a step
        with torch.no_grad():
            for _ in range(5):
                net(mels)
        usage[threshold] = net.codebook_usage()
        codes = net.get_codebook_indices(mels).flatten()
        usage[threshold]["codes_used"] = code_usage(torch.bincount(codes, minlength=32))[
            "codes_used"
        ]
        assert set(net.state_dict()) == {k for k, _ in tiny().state_dict().items()}
    assert usage[0.0] == {
        "live_codes": 1.0,
        "dead_codes": 31.0,
        "perplexity": pytest.approx(1.0),
        "reseeded_total": 0.0,
        "codes_used": 1.0,
    }
    assert (
        usage[0.5]["codes_used"] >= 24
        and usage[0.5]["live_codes"] >= 24
        and usage[0.5]["reseeded_total"] >= 31
    )
    assert usage[0.5]["live_codes"] + usage[0.5]["dead_codes"] == 32
    assert usage[0.5]["perplexity"] > 4


def test_reseeding_repeats_under_a_seed_and_resumes_identically():
    data = [torch.randn(64, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(seed: int, steps: list[torch.Tensor], q: Quantize | None = None) -> Quantize:
        if q is None:
            torch.manual_seed(seed)
            q = far_quantiser(threshold=1.0)
        q.train()
        for x in steps:
            q(x)
        return q

    a, b, other = run(0, data), run(0, data), run(1, data)
    assert a.reseeded > 15 and a.reseeded == b.reseeded
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.embed, other.embed)  # the draws do come from the seeded RNG
    # interrupted after two steps: the buffers and the RNG state restored
    first = run(0, data[:2])
    saved, rng = copy.deepcopy(first.state_dict()), torch.get_rng_state()
    torch.manual_seed(123)  # a new process
    resumed = Quantize(4, 16, dead_code_threshold=1.0)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    resumed = run(0, data[2:], resumed)
    assert all(torch.equal(a.state_dict()[k], resumed.state_dict()[k]) for k in a.state_dict())


def test_eval_never_reseeds():
    torch.manual_seed(0)
    q = far_quantiser(threshold=5.0).eval()
    before = copy.deepcopy(q.state_dict())
    x = torch.randn(64, 4)
    rng = torch.get_rng_state()
    q(x)
    assert all(torch.equal(before[k], q.state_dict()[k]) for k in before)
    assert q.reseeded == 0 and torch.equal(torch.get_rng_state(), rng)
    net = tiny(dead_code_threshold=5.0).train()
    embed = net.codebook.embed.clone()
    net.get_codebook_indices(torch.randn(2, 80, 16))  # switches to eval for the call
    assert torch.equal(net.codebook.embed, embed) and net.codebook.reseeded == 0


@pytest.mark.parametrize(
    "counts,used,perplexity",
    [
        ([5, 5, 5, 5], 4, 4.0),  # uniform: n
        ([0, 7, 0, 0], 1, 1.0),  # one code
        ([3, 0, 3, 0], 2, 2.0),  # two equal codes
        ([0.5, 0.5, 0, 0, 0, 0, 0, 0], 2, 2.0),  # EMA counts (floats) work too
        ([9, 1, 0, 0], 2, math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))),  # ~1.38
        ([0, 0, 0], 0, 0.0),  # empty histogram
    ],
)
def test_code_usage_figures(counts, used, perplexity):
    n = len(counts)
    figures = code_usage(torch.tensor(counts))
    assert figures == {
        "codes_used": used,
        "dead_codes": n - used,
        "perplexity": pytest.approx(perplexity),
        "usage_fraction": pytest.approx(used / n),
    }


RESEED_WORKER = """
import sys
import torch
import torch.distributed as dist
from models.audio.tts.lucidrains_dvae import Quantize

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same codebook on both ranks
q = Quantize(4, 16, dead_code_threshold=1.0)
q.embed.copy_(20 + torch.rand(4, 16) * 10)
q.embed_avg.copy_(q.embed)
torch.manual_seed(100 + rank)  # ranks draw different numbers, and see different data
x = torch.randn(128, 4) + rank
q.train()(x)
torch.save({"state": q.state_dict(), "x": x, "reseeded": q.reseeded}, sys.argv[1] + f"/{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_reseeded_codebook_is_the_same_on_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(RESEED_WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "codebase"), str(REPO / "tests")])
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    port = f"--master_port={free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port]
    cmd += ["--master_addr=127.0.0.1", str(script), str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for name in ("embed", "cluster_size", "embed_avg"):
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert r0["reseeded"] == r1["reseeded"] >= 14  # one code per rank's data at most stays
    dead = r0["state"]["cluster_size"] == 1.0
    columns = r0["state"]["embed"][:, dead].transpose(0, 1)
    assert all((r0["x"] == v).all(1).any() for v in columns)  # rank 0's vectors


# ----------------------------------------------------------------------------- discrete_token
def dvae_files(root: Path, net: torch.nn.Module | None = None, kwargs: dict = TINY) -> Path:
    """A random-weight DVAE saved as .pth and its DLAS network YAML ``root/experiments/
    dvae.yml`` (weights path relative to the YAML, as DLAS's seed writes it)."""
    net = net or tiny()
    (root / "experiments").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), root / "dvae.pth")
    config = {
        "path": {"pretrain_model_dvae": "../dvae.pth", "strict_load": True},
        "networks": {
            "dvae": {"type": "generator", "which_model_G": "lucidrains_dvae", "kwargs": kwargs}
        },
    }
    path = root / "experiments" / "dvae.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def token_options(config: str = "experiments/dvae.yml", **extra: Any) -> dict:
    return {"type": "discrete_token", "dvae_config": config, "in": "mel", "out": "codes", **extra}


def test_discrete_token_gives_the_dvaes_codes_and_holds_no_state(tmp_path):
    torch.manual_seed(1)
    net = tiny()
    dvae_files(tmp_path, net)
    inj = build_from_yaml(INJECTORS, token_options(), base_dir=tmp_path)
    mel = torch.randn(3, 80, 37)
    codes = inj({"mel": mel})["codes"]
    assert codes.dtype == torch.long and codes.shape == (3, 10)
    assert torch.equal(codes, net.eval().get_codebook_indices(mel))
    assert not inj.state_dict() and not list(inj.parameters())  # kept out of the module tree
    assert not inj.dvae.training and not any(p.requires_grad for p in inj.dvae.parameters())
    inj.train()
    assert not inj.dvae.training


def test_discrete_token_picks_the_named_network(tmp_path):
    path = dvae_files(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["networks"] = {"other": config["networks"]["dvae"]}
    config["path"] = {"pretrain_model_other": "../dvae.pth"}
    path.write_text(yaml.safe_dump(config))
    inj = build_from_yaml(INJECTORS, token_options(), base_dir=tmp_path)  # the only one
    assert inj({"mel": torch.randn(1, 80, 8)})["codes"].shape == (1, 2)
    with pytest.raises(AssertionError, match="no network 'dvae'"):
        build_from_yaml(INJECTORS, token_options(dvae_name="dvae"), base_dir=tmp_path)


def _problems(tmp_path: Path, options: dict) -> str:
    with pytest.raises(AssertionError) as e:
        build_from_yaml(INJECTORS, options, base_dir=tmp_path, path="steps.gpt.injectors.codes")
    return str(e.value)


def test_discrete_token_file_errors_are_validation_problems(tmp_path):
    msg = _problems(tmp_path, token_options("nowhere.yml"))
    assert "steps.gpt.injectors.codes.dvae_config" in msg and "does not exist" in msg

    dvae_files(tmp_path)
    (tmp_path / "dvae.pth").unlink()
    msg = _problems(tmp_path, token_options())
    assert "pretrain_model_dvae" in msg and "do not exist" in msg

    dvae_files(tmp_path, tiny(hidden_dim=16))  # file from another config
    msg = _problems(tmp_path, token_options())
    assert "do not match networks.dvae" in msg and "encoder.0.0.weight" in msg

    dvae_files(tmp_path, kwargs={**TINY, "num_tokenz": 3})
    msg = _problems(tmp_path, token_options())
    assert "networks.dvae.kwargs.num_tokenz" in msg and "did you mean 'num_tokens'" in msg


class MelViewInjector(Injector):
    """Test helper: the toy features [B, 16] viewed as a 4-bin "mel" [B, 4, 4]."""

    def forward(self, state: dict[str, Any]) -> dict[str, Any]:
        return {self.output: state[self.input].view(-1, 4, 4)}


def test_dvae_never_reaches_the_runs_checkpoint(tmp_path):
    small = {**TINY, "channels": 4, "hidden_dim": 8, "codebook_dim": 8, "num_tokens": 8}
    dvae_files(tmp_path, tiny(**{k: small[k] for k in ("channels", "hidden_dim")},
                              codebook_dim=8, num_tokens=8), kwargs=small)  # fmt: skip
    injectors = {
        "view": {"type": "mel_view", "in": "x", "out": "mel"},
        "codes": token_options(),
        "pred": {"type": "generator", "generator": "mlp", "in": "x", "out": "pred"},
    }
    trainer = make_trainer(
        tmp_path,
        steps={"fit": {"injectors": {**injectors, "_replace": True}}},
        train={"niter": 2},
        logger={"save_checkpoint_freq": 2},
    )
    trainer.train()
    inj = trainer.steps["fit"].injectors[1]
    assert isinstance(inj, DiscreteTokenInjector) and inj.dvae.codebook.embed.shape == (8, 8)
    files = [p for p in (tmp_path / "toy").rglob("*") if p.is_file()]
    assert any(p.suffix == ".state" for p in files)
    # tensor names are readable in the saved files (the trained network's are there) ...
    assert any(b"head.weight" in p.read_bytes() for p in files)
    for p in files:  # ... and none of the DVAE's
        assert b"codebook.embed" not in p.read_bytes(), p


def test_missing_dvae_fails_the_experiments_validation(tmp_path):
    injectors = {"codes": token_options("missing.yml", **{"in": "x"})}
    with pytest.raises(ConfigError, match=r"steps\.fit\.injectors\.codes\.dvae_config"):
        make_trainer(tmp_path, steps={"fit": {"injectors": copy.deepcopy(injectors)}})


def test_golden_table_script_runs(tmp_path):
    shutil.copytree(GOLDEN, tmp_path / "g")
    rows = golden.dvae_rows(tmp_path / "g") + golden.mel_rows(tmp_path / "g")
    text = golden.table(rows)
    assert "codes36" in text and "mel_2s_nonorm" in text and "NO" not in text
