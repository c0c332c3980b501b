"""Run logging: TensorBoard, optional Weights & Biases, console lines and a progress bar.

Only rank 0 builds an enabled :class:`TrainingLogger`; every other rank gets a disabled one whose
methods return immediately, so the trainer calls the logger unconditionally.
"""

from __future__ import annotations

import html
import logging
import math
import sys
import tempfile
import uuid
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

_log = logging.getLogger(__name__)
# Messages already go to the console through tqdm.write; without a handler of our own, Python's
# "last resort" handler would print warnings a second time to stderr.
_log.addHandler(logging.NullHandler())

WANDB_MISSING = (
    "wandb logging is enabled (wandb: true) but the 'wandb' package is not installed: "
    'run `pip install -e ".[wandb]"` or set `wandb: false` in the experiment options'
)

_RATE_SUFFIX = "_per_sec"


def format_number(value: float, scientific: bool = False) -> str:
    """Compact text for a logged number: 4 significant digits, scientific when tiny or asked."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if scientific:
        return f"{value:.1e}"
    if value != 0.0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _is_lr(leaf: str) -> bool:
    return leaf == "lr" or leaf.startswith("lr_") or leaf.endswith("_lr")


def format_console_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
    """``[step 1200/50000 | ep 3] loss/total 0.4123 | lr 1.0e-04 | 512.3 samples/s``.

    ``epoch`` goes into the header, ``*_per_sec`` keys become rates at the end, and the
    ``train/`` prefix is dropped because every console value is a training value.
    """
    header = f"step {step}/{total_steps}"
    parts: list[str] = []
    rates: list[str] = []
    for key, raw in scalars.items():
        value = raw.item() if isinstance(raw, torch.Tensor) else raw
        name = key[len("train/") :] if key.startswith("train/") else key
        leaf = name.rsplit("/", 1)[-1]
        if leaf in ("epoch", "ep"):
            header += f" | ep {int(value)}"
        elif leaf.endswith(_RATE_SUFFIX):
            unit = leaf[: -len(_RATE_SUFFIX)] or "it"
            rates.append(f"{float(value):.1f} {unit}/s")
        else:
            parts.append(f"{name} {format_number(value, scientific=_is_lr(leaf))}")
    return " | ".join([f"[{header}]" + (" " + parts[0] if parts else "")] + parts[1:] + rates)


def _audio_to_numpy(wav: torch.Tensor) -> np.ndarray:
    """Mono float32 samples in [-1, 1] from a (T,), (1, T), (C, T) or (1, C, T) tensor."""
    x = wav.detach().to("cpu", torch.float32)
    while x.dim() > 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x.mean(dim=0)  # TensorBoard's audio plugin only takes mono
    if x.dim() != 1:
        raise ValueError(f"audio must be (T,), (C, T) or (1, C, T); got shape {tuple(wav.shape)}")
    return x.clamp(-1.0, 1.0).numpy()


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit mono PCM WAV of float samples in [-1, 1]."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


def _image_to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """HWC (or HW) uint8; float images are taken as [0, 1] so TB and wandb see the same pixels."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image must be HW or HWC with 1, 3 or 4 channels; got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def mel_image(mel: torch.Tensor) -> torch.Tensor:
    """Log-mel [n_mels, frames] -> HWC float image in [0, 1] (viridis, low bins at the bottom)."""
    import matplotlib

    mel = mel.detach().float().cpu()
    lo, hi = float(mel.min()), float(mel.max())
    norm = (mel - lo) / max(hi - lo, 1e-5)
    rgba = matplotlib.colormaps["viridis"](norm.flip(0).numpy())
    return torch.from_numpy(rgba[..., :3]).float()


def visual_image(value: torch.Tensor, is_mel: bool) -> torch.Tensor | None:
    """A state tensor's first item as an HWC image in [0, 1] (DLAS ``logger.visuals``), or None
    when it has no picture: mels [C, T] as spectrograms (``is_mel``: low bins at the bottom),
    images [3, H, W] or [H, W] with their values stretched to [0, 1]."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or not value.is_floating_point():
        return None
    item = value[0].detach().float().cpu()  # [C, T] / [3, H, W] / [T]
    if item.dim() == 3 and item.shape[0] == 1:
        item = item[0]
    if is_mel and item.dim() == 2:
        return mel_image(item)
    lo, hi = float(item.min()), float(item.max())
    item = (item - lo) / max(hi - lo, 1e-5)
    if item.dim() == 3 and item.shape[0] in (3, 4):
        return item[:3].permute(1, 2, 0)
    return item if item.dim() == 2 else None


class TrainingLogger:
    """Writes a run's scalars, media and messages to TensorBoard, wandb and the console."""

    def __init__(
        self,
        run_dir: Path,
        *,
        name: str,
        total_steps: int,
        start_step: int = 0,
        print_freq: int = 100,
        use_tb: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_mode: str | None = None,
        config: dict | None = None,
        enabled: bool = True,
        progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.print_freq = int(print_freq)
        self.enabled = enabled
        self._progress_enabled = enabled and progress
        self._bar: tqdm | None = None
        self._bar_step = self.start_step
        self._writer: Any = None
        self._wandb: Any = None  # the wandb module, kept so media helpers need no re-import
        self._wandb_run: Any = None
        self._closed = False
        if not enabled:
            return
        if use_tb:
            # Imported here: tensorboard takes ~1 s to import and disabled ranks never need it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb_logger"))
        if wandb:
            self._init_wandb(wandb_project or name, wandb_mode, config)

    # --- setup -------------------------------------------------------------------------------

    def _init_wandb(self, project: str, mode: str | None, config: dict | None) -> None:
        try:
            import wandb as wandb_module
        except ImportError as e:
            raise ImportError(WANDB_MISSING) from e
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb_module
        self._wandb_run = wandb_module.init(
            project=project,
            name=self.name,
            id=self._wandb_run_id(),
            dir=str(self.run_dir),
            config=config,
            mode=mode,
            resume="allow",
        )

    def _wandb_run_id(self) -> str:
        """A run id stored in the run folder, so a resumed run continues the same wandb run.

        ``resume="allow"`` only resumes when the id is the same as last time; without a stored
        id every restart would start a new wandb run.
        """
        path = self.run_dir / "wandb_run_id.txt"
        if path.is_file():
            stored = path.read_text().strip()
            if stored:
                return stored
        run_id = uuid.uuid4().hex[:8]
        path.write_text(run_id + "\n")
        return run_id

    # --- per-step ----------------------------------------------------------------------------

    def progress(self, step: int) -> None:
        """Move the progress bar to ``step``; called every step, so only a counter update."""
        if not self._progress_enabled:
            return
        bar = self._bar
        if bar is None:
            bar = self._bar = self._make_bar()
        delta = step - self._bar_step
        if delta > 0:
            bar.update(delta)
            self._bar_step = step

    def _make_bar(self) -> tqdm:
        # Redirected output (a log file, a cluster job) keeps every refresh, so refresh rarely.
        interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        return tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if interactive else 30.0,
            smoothing=0.05,
        )

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Write each scalar to TensorBoard and all of them as one wandb row."""
        if not self.enabled or not scalars:
            return
        values = {
            k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in scalars.items()
        }
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def console(self, step: int, scalars: dict[str, float]) -> None:
        """Print one compact line of scalars without breaking the progress bar."""
        if not self.enabled:
            return
        tqdm.write(format_console_line(step, self.total_steps, scalars), file=sys.stdout)

    # --- messages ----------------------------------------------------------------------------

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(f"[{self.name}] {msg}", file=sys.stdout)
        _log.info(msg)

    def warning(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(f"[{self.name}] WARNING: {msg}", file=sys.stdout)
        _log.warning(msg)

    def error(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(f"[{self.name}] ERROR: {msg}", file=sys.stdout)
        _log.error(msg)

    # --- media -------------------------------------------------------------------------------

    def log_audio(self, tag: str, wav: torch.Tensor, sample_rate: int, step: int) -> None:
        """Log a waveform (values in [-1, 1]; multi-channel audio is averaged to mono)."""
        if not self.enabled:
            return
        samples = _audio_to_numpy(wav)
        if self._writer is not None:
            self._writer.add_audio(
                tag, torch.from_numpy(samples), global_step=step, sample_rate=sample_rate
            )
        if self._wandb_run is not None:
            # wandb.Audio needs the optional soundfile package for raw arrays but not for a file,
            # so hand it a WAV written with the standard library; wandb copies it while logging.
            with tempfile.TemporaryDirectory(prefix="wandb-audio-") as tmp:
                path = Path(tmp) / f"{tag.replace('/', '_')}_{step}.wav"
                _write_wav(path, samples, sample_rate)
                self._wandb_run.log({tag: self._wandb.Audio(str(path))}, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an HWC (or HW) image: uint8, or float in [0, 1]."""
        if not self.enabled:
            return
        pixels = _image_to_uint8(image)
        if self._writer is not None:
            formats = "HWC" if pixels.ndim == 3 else "HW"
            self._writer.add_image(tag, pixels, global_step=step, dataformats=formats)
        if self._wandb_run is not None:
            self._wandb_run.log({tag: self._wandb.Image(pixels)}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(
                {tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step
            )

    # --- lifetime ----------------------------------------------------------------------------

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """Close the bar, the TensorBoard writer and the wandb run; safe to call again."""
        if self._closed:
            return
        self._closed = True
        self._progress_enabled = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish()

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
