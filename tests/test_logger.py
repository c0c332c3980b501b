"""TrainingLogger: TensorBoard/wandb output, console lines, progress bar, disabled ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.logger import TrainingLogger, format_console_line, format_number, visual_image


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(run_dir / "tb_logger"), size_guidance={"scalars": 0, "images": 0, "audio": 0}
    )
    acc.Reload()
    return acc


def test_scalars_are_written_to_tensorboard(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=100, progress=False)
    logger.log_scalars(10, {"loss/mse": 0.5, "train/lr": 1e-4})
    logger.log_scalars(20, {"loss/mse": torch.tensor(0.25)})
    logger.close()

    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"loss/mse", "train/lr"}
    mse = acc.Scalars("loss/mse")
    assert [e.step for e in mse] == [10, 20]
    assert [e.value for e in mse] == pytest.approx([0.5, 0.25])
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-4)


def test_media_and_text_are_written_to_tensorboard(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=100, progress=False)
    t = torch.arange(1600) / 16000
    logger.log_audio("eval/sine", 0.5 * torch.sin(2 * torch.pi * 440 * t)[None], 16000, step=5)
    logger.log_image("eval/mel", np.random.rand(16, 32, 3).astype(np.float32), step=5)
    logger.log_image("eval/gray", np.zeros((8, 8), dtype=np.uint8), step=6)
    logger.log_text("eval/transcript", "hello world", step=5)
    logger.close()

    acc = _events(tmp_path)
    assert acc.Tags()["audio"] == ["eval/sine"]
    audio = acc.Audio("eval/sine")[0]
    assert (audio.step, audio.sample_rate, audio.length_frames) == (5, 16000, 1600)
    assert set(acc.Tags()["images"]) == {"eval/mel", "eval/gray"}
    mel = acc.Images("eval/mel")[0]
    assert (mel.step, mel.height, mel.width) == (5, 16, 32)
    assert "eval/transcript/text_summary" in acc.Tags()["tensors"]


def test_bad_image_shape_is_rejected(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=1, progress=False)
    with pytest.raises(ValueError, match="HWC"):
        logger.log_image("x", np.zeros((2, 3, 4, 5)), step=0)
    logger.close()


def test_disabled_logger_creates_no_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    logger = TrainingLogger(run_dir, name="run", total_steps=10, wandb=True, enabled=False)
    logger.log_scalars(1, {"loss": 1.0})
    logger.console(1, {"loss": 1.0})
    logger.progress(1)
    logger.info("hello")
    logger.warning("careful")
    logger.log_audio("a", torch.zeros(100), 16000, 1)
    logger.log_image("i", np.zeros((4, 4, 3), dtype=np.uint8), 1)
    logger.log_text("t", "x", 1)
    logger.flush()
    logger.close()
    assert not run_dir.exists()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_console_line_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=50000, use_tb=False, progress=False)
    logger.console(
        1200,
        {
            "train/epoch": 3,
            "loss/total": 0.412345,
            "train/lr": 1e-4,
            "train/grad_norm": 1.2301,
            "train/samples_per_sec": 512.34,
        },
    )
    logger.close()
    line = capsys.readouterr().out.strip()
    assert (
        line == "[step 1200/50000 | ep 3] loss/total 0.4123 | lr 1.0e-04 | grad_norm 1.23 | "
        "512.3 samples/s"
    )


def test_format_number() -> None:
    assert format_number(0.412345) == "0.4123"
    assert format_number(12345.678) == "1.235e+04"
    assert format_number(3e-6) == "3.000e-06"
    assert format_number(0.0) == "0"
    assert format_number(7) == "7"
    assert format_number(3e-4, scientific=True) == "3.0e-04"
    assert format_number(float("nan")) == "nan"
    assert format_console_line(3, 10, {}) == "[step 3/10]"


def test_info_and_warning_are_printed_with_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = TrainingLogger(tmp_path, name="myrun", total_steps=10, use_tb=False, progress=False)
    logger.info("saved checkpoint")
    logger.warning("loss is nan")
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["[myrun] saved checkpoint", "[myrun] WARNING: loss is nan"]


def test_progress_bar_counts_from_start_step(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=100, start_step=40, use_tb=False)
    logger.progress(41)
    logger.progress(45)
    logger.progress(45)  # the same step again must not advance the bar
    bar = logger._bar
    assert bar is not None and bar.total == 100 and bar.n == 45
    assert bar.mininterval >= 1.0
    logger.close()
    assert logger._bar is None


def test_progress_counts_every_step_but_redraws_rarely(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Called every training step: a counter update, not a redraw per step (its cost per call
    # is measured by benchmarks, not asserted here).
    logger = TrainingLogger(tmp_path, name="run", total_steps=200_000, use_tb=False)
    for step in range(1, 20_001):
        logger.progress(step)
    assert logger._bar is not None and logger._bar.n == 20_000
    logger.close()
    redraws = capsys.readouterr().err.count("\r")
    assert 1 <= redraws <= 5, f"{redraws} redraws for 20000 steps"


def test_progress_disabled_creates_no_bar(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=10, use_tb=False, progress=False)
    logger.progress(5)
    assert logger._bar is None
    logger.close()


def test_close_twice_is_safe(tmp_path: Path) -> None:
    logger = TrainingLogger(tmp_path, name="run", total_steps=10)
    logger.progress(1)
    logger.log_scalars(1, {"loss": 1.0})
    logger.close()
    logger.close()
    logger.log_scalars(2, {"loss": 2.0})  # after close: ignored, not an error
    assert _events(tmp_path).Scalars("loss")[0].value == 1.0


def test_missing_wandb_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"|wandb: false'):
        TrainingLogger(tmp_path, name="run", total_steps=10, use_tb=False, wandb=True)


@pytest.mark.slow  # 4-5 s: wandb's offline run folder
def test_wandb_offline_writes_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starts a real offline wandb run (about 3-5 s here: wandb spawns its service process)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    run_dir = tmp_path / "run"
    logger = TrainingLogger(
        run_dir,
        name="offline-test",
        total_steps=10,
        use_tb=False,
        progress=False,
        wandb=True,
        wandb_mode="offline",
        config={"lr": 1e-4},
    )
    logger.log_scalars(1, {"loss/mse": 0.5})
    logger.log_audio("eval/audio", torch.zeros(1, 800), 16000, step=1)
    logger.log_image("eval/image", np.zeros((4, 4, 3), dtype=np.uint8), step=1)
    logger.log_text("eval/text", "hi", step=1)
    logger.close()
    logger.close()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # The audio went through our own WAV writer (no soundfile needed) and was copied by wandb.
    assert list(runs[0].glob("files/media/audio/**/*.wav"))
    assert list(runs[0].glob("files/media/images/**/*.png"))


def test_visual_image_shapes() -> None:
    mel = torch.randn(2, 80, 30)
    img = visual_image(mel, is_mel=True)
    assert img.shape == (80, 30, 3) and float(img.min()) >= 0 and float(img.max()) <= 1
    rgb = visual_image(torch.rand(2, 3, 8, 9) * 5, is_mel=False)
    assert rgb.shape == (8, 9, 3) and float(rgb.max()) == pytest.approx(1.0)
    assert visual_image(torch.randn(4, 16), is_mel=False) is None  # a vector per item
    assert visual_image(torch.ones(2, 5, dtype=torch.long), is_mel=True) is None


def test_dlas_visuals_are_drawn_every_visual_debug_rate(tmp_path: Path, caplog) -> None:
    from helpers import make_trainer

    logger = {"visuals": ["mel", "gen"], "visual_debug_rate": 2, "is_mel_spectrogram": True}
    trainer = make_trainer(tmp_path, logger=logger, train={"niter": 4})
    assert "no step produces state key 'gen'" in caplog.text
    for step in (1, 2, 3, 4):
        trainer.step = step
        trainer._draw_visuals({"mel": torch.randn(2, 80, 12), "x": torch.randn(2, 16)})
    trainer.logger.flush()
    acc = EventAccumulator(str(tmp_path / "toy" / "tb_logger"))
    acc.Reload()
    assert acc.Tags()["images"] == ["visuals/mel"]
    assert [e.step for e in acc.Images("visuals/mel")] == [2, 4]
