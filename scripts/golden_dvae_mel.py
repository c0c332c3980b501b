"""Compare our ``lucidrains_dvae`` and ``torch_mel_spectrogram`` with the outputs of the
original DLAS/Tortoise code (shared/golden/tortoise beside the repository; see its
README.md for how they were made).

    python scripts/golden_dvae_mel.py [--golden ../shared/golden/tortoise]

prints one row per compared tensor: its max |ours - golden| and the tolerance the tests use.
tests/test_dvae.py and tests/test_audio_injectors.py call the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "codebase"))

from safetensors.torch import load_file  # noqa: E402

import models.audio.tts  # noqa: E402,F401 - registers lucidrains_dvae
import trainer.injectors  # noqa: E402,F401 - registers torch_mel_spectrogram
from models import build_network  # noqa: E402
from trainer.component import ComponentSpec, TrainerEnv, build_component  # noqa: E402
from trainer.injectors import INJECTORS  # noqa: E402
from utils.io import load_module  # noqa: E402
from utils.schema import Problems  # noqa: E402

GOLDEN = REPO.parent / "shared" / "golden" / "tortoise"  # beside the repository
FLOAT_TOL = 1e-5  # DVAE outputs (fp32, a few conv layers)
# The log-mel near the 1e-5 floor amplifies FFT rounding (a different FFT build gives
# relative differences ~1e-4 in the tiny bins); measured here: max 9.7e-5 (at -11.2).
MEL_TOL = 2e-5


@dataclass
class Row:
    name: str
    max_diff: float  # max |ours - golden|; for integer tensors the count of unequal entries
    tol: float  # allowed max |diff|, relative to max(1, max |golden|)
    shape: list[int]
    scale: float = 1.0  # max(1, max |golden|)

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tol * self.scale


def compare(name: str, ours: torch.Tensor, golden: torch.Tensor, tol: float) -> Row:
    """One comparison: shapes must match; integers must be equal; floats within ``tol`` times
    max(1, the golden tensor's largest magnitude)."""
    if ours.shape != golden.shape:
        raise AssertionError(f"{name}: shape {list(ours.shape)} vs golden {list(golden.shape)}")
    if not golden.is_floating_point():
        return Row(name, float((ours != golden).sum()), 0.0, list(golden.shape))
    diff = float((ours.float() - golden).abs().max())
    return Row(name, diff, tol, list(golden.shape), max(1.0, float(golden.abs().max())))


def dvae_rows(golden: Path = GOLDEN) -> list[Row]:
    """The tiny DVAE of dvae_tiny.pth (loaded strictly) against dvae_tiny_io.safetensors."""
    kwargs = json.loads((golden / "dvae_tiny.json").read_text())["kwargs"]
    net = build_network("lucidrains_dvae", kwargs)
    load_module(net, golden / "dvae_tiny.pth", strict=True)
    net.eval()
    io = load_file(str(golden / "dvae_tiny_io.safetensors"))
    with torch.no_grad():
        decoded, pre_out = net.decode(io["codes"])
        recon, commitment, out = net(io["mel36"])
        return [
            compare("codes", net.get_codebook_indices(io["mel"]), io["codes"], 0),
            compare("codes36", net.get_codebook_indices(io["mel36"]), io["codes36"], 0),
            compare("decoded", decoded, io["decoded"], FLOAT_TOL),
            compare("decoded_pre_out", pre_out, io["decoded_pre_out"], FLOAT_TOL),
            compare("forward_recon_loss", recon, io["forward_recon_loss"], FLOAT_TOL),
            compare(
                "forward_commitment_loss", commitment, io["forward_commitment_loss"], FLOAT_TOL
            ),
            compare("forward_out", out, io["forward_out"], FLOAT_TOL),
        ]


def mel_injector(options: dict, base_dir: Path = REPO) -> torch.nn.Module:
    """A ``torch_mel_spectrogram`` injector built from DLAS-style options, as the trainer does."""
    problems = Problems()
    cls = INJECTORS.get("torch_mel_spectrogram")
    kwargs = cls.check_options(options, "mel", problems, base_dir)
    problems.raise_if_any()
    spec = ComponentSpec("mel", "mel", cls, kwargs, inputs=["wav"], outputs=["mel"])
    return build_component(spec, {"env": TrainerEnv(torch.device("cpu"), base_dir)})


def mel_rows(golden: Path = GOLDEN) -> list[Row]:
    """DLAS defaults, with and without the golden mel_norms.pth, against mel_io.safetensors."""
    io = load_file(str(golden / "mel_io.safetensors"))
    rows = []
    for suffix, options in (
        ("", {"mel_norm_file": str(golden / "mel_norms.pth")}),
        ("_nonorm", {}),
    ):
        inj = mel_injector(options)
        for item in ("1s", "2s"):
            mel = inj({"wav": io[f"wav_{item}"]})["mel"]
            rows.append(compare(f"mel_{item}{suffix}", mel, io[f"mel_{item}{suffix}"], MEL_TOL))
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'tensor':<26} {'shape':<14} {'max |diff|':>11} {'allowed':>9}  ok"]
    for r in rows:
        lines.append(
            f"{r.name:<26} {str(r.shape):<14} {r.max_diff:>11.3g} {r.tol * r.scale:>9.2g}  "
            f"{'yes' if r.ok else 'NO'}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden", type=Path, default=GOLDEN, help="folder of the fixtures")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the fixtures were made
    rows = dvae_rows(args.golden) + mel_rows(args.golden)
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
