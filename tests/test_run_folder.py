"""No run is lost: one run per output folder (refused, resumed or replaced, never mixed), a lock against a
second process, best/ from this run only, a diverging run stopped before it writes, strict JSON logs, and
clear errors for a checkpoint that does not fit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import TINY_BASIC
from PIL import Image

from resnet_backbone import ResNetBackbone
from resnet_backbone.cli.main import main
from resnet_backbone.training.engine import json_line
from resnet_backbone.training.run_folder import LOCK_NAME, run_folder_lock

# A tiny backbone under FCOS, on a few 32-pixel synthetic images: one training step takes seconds.
TINY_TRAIN = ["--train-images", "4", "--image-size", "32", "--batch-size", "2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    ResNetBackbone(**TINY_BASIC).save_pretrained(directory)
    return str(directory)


def _train(output, *args: str) -> int:
    return main(["train", *TINY_TRAIN, *args, "--output-dir", str(output)])


def _snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (the lock file aside)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != LOCK_NAME
    }


@pytest.fixture
def earlier_run(tmp_path):
    """A folder that holds (the files of) an earlier run."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "task.json").write_text("{}")
    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "losses.jsonl").write_text(json_line({"step": 1, "loss": 1.0, "lr": 0.001}))
    (tmp_path / "notes.txt").write_text("the user's own file")
    return tmp_path


def test_a_folder_holding_a_run_is_refused_naming_what_it_holds(earlier_run, capsys):
    before = _snapshot(earlier_run)
    assert _train(earlier_run, "--steps", "1") == 2
    error = capsys.readouterr().err
    assert "already holds a training run (checkpoint.pt, losses.jsonl, model)" in error
    assert "--resume" in error and "--overwrite" in error and error.count("\n") == 1
    assert _snapshot(earlier_run) == before


def test_resume_and_overwrite_together_are_refused(earlier_run, capsys):
    assert _train(earlier_run, "--steps", "1", "--resume", "--overwrite") == 2
    assert "not allowed with argument --resume" in capsys.readouterr().err


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    with run_folder_lock(tmp_path):
        assert _train(tmp_path, "--steps", "1") == 2
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    error = capsys.readouterr().err
    assert f"Another training run (PID {os.getpid()} on " in error and f"is writing into {tmp_path}" in error
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: no holder named any more
    assert _snapshot(tmp_path) == {}


def test_an_infinite_learning_rate_is_refused_before_anything_is_touched(earlier_run, capsys):
    before = _snapshot(earlier_run)
    assert _train(earlier_run, "--steps", "1", "--overwrite", "--lr", "inf") == 2
    assert "--lr: expected a finite number >= 0, got 'inf'" in capsys.readouterr().err
    assert _snapshot(earlier_run) == before


def test_the_logs_are_strict_json():
    assert json.loads(json_line({"step": 1, "loss": 0.5})) == {"step": 1, "loss": 0.5}
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not JSON compliant"):
            json_line({"step": 1, "loss": value})


def test_resuming_from_a_truncated_checkpoint_is_one_clear_error(tmp_path, tiny_weights, capsys):
    torch.save({"model": {"weight": torch.zeros(1000)}, "step": 1}, tmp_path / "checkpoint.pt")
    complete = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(complete[: len(complete) // 2])
    before = _snapshot(tmp_path)
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--resume") == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoint.pt'} is not a readable training checkpoint (truncated or corrupt?)" in error
    assert error.count("\n") == 1 and _snapshot(tmp_path) == before


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_a_run_that_fits_resumes(tmp_path, tiny_weights, capsys):
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--stop-at-step", "1") == 0
    # As if the run had been killed after logging step 2 but before checkpointing it: resuming redoes it.
    with open(tmp_path / "losses.jsonl", "a") as log:
        log.write(json_line({"step": 2, "loss": 99.0, "lr": 0.0}))
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and 99.0 not in [json.loads(line)["loss"] for line in (tmp_path / "losses.jsonl").open()]
    (tmp_path / "best").mkdir()  # a stale best/ of some earlier run
    (tmp_path / "metrics.jsonl").write_text(json_line({"step": 7, "mAP": 1.0}))
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "1", "--overwrite") == 0
    assert "removed the earlier run's checkpoint.pt, losses.jsonl, metrics.jsonl, model, backbone, best" in (
        capsys.readouterr().out
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        LOCK_NAME, "backbone", "checkpoint.pt", "losses.jsonl", "model"
    ]  # fmt: skip
    assert len((tmp_path / "losses.jsonl").read_text().splitlines()) == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


@pytest.mark.slow
def test_resuming_with_another_detector_names_what_differs_and_writes_nothing(tmp_path, tiny_weights, capsys):
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--stop-at-step", "1") == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--resume", "--detector", "retinanet") == 2
    error = capsys.readouterr().err
    assert "checkpoint.pt was saved for another model (architecture 'fcos' there, 'retinanet' here)" in error
    assert error.count("\n") == 1 and _snapshot(tmp_path) == before
    # A checkpoint without the model's description (as older versions wrote): the weights tell.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["model_spec"]
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _snapshot(tmp_path)
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "2", "--resume", "--detector", "retinanet") == 2
    error = capsys.readouterr().err
    assert "checkpoint.pt holds the weights of another model (missing from the checkpoint: " in error
    assert error.count("\n") == 1 and _snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(tmp_path, tiny_weights, capsys):
    """A huge learning rate: step 1's loss is finite and its update enormous, so step 2's loss is not."""
    assert _train(tmp_path, "--weights", tiny_weights, "--steps", "4", "--checkpoint-every", "1", "--lr", "1e30") == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "Training diverged at step 2: the loss is nan." in error
    assert f"{tmp_path / 'checkpoint.pt'} still holds step 1" in error
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "model").exists() and not (tmp_path / "backbone").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [1]


def _write_mask_folder(directory, count: int = 4, size: int = 32) -> None:
    """Images with a bright square, and masks with the square as class 1."""
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir()
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        corner = 4 + 3 * index
        pixels[corner : corner + 12, corner : corner + 12] = 230
        mask[corner : corner + 12, corner : corner + 12] = 1
        Image.fromarray(pixels).save(directory / "images" / f"{index}.png")
        Image.fromarray(mask).save(directory / "masks" / f"{index}.png")


@pytest.mark.slow
def test_best_is_chosen_among_this_runs_evaluations_only(tmp_path):
    data = tmp_path / "data"
    _write_mask_folder(data)
    output = tmp_path / "run"
    common = ["--task", "segmentation", "--data", str(data), "--val-data", str(data), "--eval-every", "1"]

    def metrics() -> list[dict]:
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    def weights(name: str) -> dict[str, torch.Tensor]:
        return torch.load(output / name / "task_model.pt", weights_only=True)

    assert _train(output, *common, "--steps", "2", "--stop-at-step", "1") == 0
    # As if the run had been killed after evaluating step 2 but before checkpointing it: that evaluation
    # (a perfect score) is gone with the step, and the resumed run must not measure itself against it.
    with open(output / "metrics.jsonl", "a") as log:
        log.write(json_line({"step": 2, "mIoU": 1.0, "per_class_IoU": {"0": 1.0, "1": 1.0}}))
    assert _train(output, *common, "--steps", "2", "--resume") == 0
    resumed = metrics()
    assert [line["step"] for line in resumed] == [1, 2] and resumed[1]["mIoU"] < 1.0
    best_step = max(resumed, key=lambda line: line["mIoU"])["step"]
    assert best_step == 1 or all(torch.equal(weights("best")[k], v) for k, v in weights("model").items())
    # A new run (learning rate 0: its one evaluation may well score below the earlier run's best) keeps its
    # own model as best/, with its own task.json beside it.
    assert _train(output, *common, "--steps", "1", "--lr", "0", "--overwrite") == 0
    assert [line["step"] for line in metrics()] == [1]
    best, final = weights("best"), weights("model")
    assert best.keys() == final.keys() and all(torch.equal(best[key], final[key]) for key in final)


@pytest.mark.slow
def test_a_live_run_keeps_a_second_process_out_and_a_killed_ones_lock_is_taken_over(tmp_path, tiny_weights):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "resnet_backbone.cli", "train", *TINY_TRAIN, "--weights", tiny_weights,
               "--steps", "10000", "--checkpoint-every", "0", "--output-dir", str(output)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (output / "losses.jsonl").is_file():  # the first step is logged: the lock is held
            assert holder.poll() is None, holder.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        second = subprocess.run([*command, "--overwrite"], env=environment, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2
        assert f"Another training run (PID {holder.pid} on " in second.stderr
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (output / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # the killed holder never released it
    third = subprocess.run([*command, "--steps", "1", "--overwrite"], env=environment, capture_output=True,
                           text=True, timeout=240)  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"was left by PID {holder.pid} on " in third.stdout and "ended without releasing it" in third.stdout
    assert (output / LOCK_NAME).read_text() == ""
