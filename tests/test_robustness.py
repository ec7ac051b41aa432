"""Nothing lost: kills, pre-emption, truncated and malicious checkpoints, non-finite numbers, unreadable images.

The exactness tests train on one CPU thread, in-process and in the ``run.py`` subprocesses alike, so that a resumed
run and a straight run do the same floating-point work and can be compared with ``torch.equal``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_cfg, make_image_folder, run_cli, start_cli
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vittm.data.bad_images import UnreadableImageError
from vittm.models import read_state_dict
from vittm.tasks.classification import ClassificationModule
from vittm.tasks.run import evaluate, train
from vittm.training.callbacks import StopSignals
from vittm.training.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    UnsafeCheckpointError,
    find_resume,
    load_checkpoint,
    save_weights,
)
from vittm.training.module import NonFiniteError
from vittm.training.validate import ConfigError

# Every source of randomness in play: data order, per-image crop and flip, drop-path, mixup (numpy), EMA.
# 2048 images in batches of 32: 64 optimizer steps per epoch, 128 in all, long enough to kill at a random step.
EXACT = [*TINY, "data.train_subset=2048", "data.val_subset=64", "data.batch_size=32", "trainer.max_epochs=2",
         "augment=fashion_mnist", "model.drop_path_rate=0.1", "augment.mixup=0.2", "ema.decay=0.9"]
STEPS_PER_EPOCH = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Also much faster on this shared 2-core machine: two busy threads per process oversubscribe it badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread) -> dict:
    """The uninterrupted run every interrupted one must reproduce: its final last.ckpt."""
    run = tmp_path_factory.mktemp("straight")
    train(compose_cfg(run, *EXACT))
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_training(ckpt: dict, reference: dict) -> None:
    assert ckpt["global_step"] == reference["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in reference["state_dict"].items():  # live weights and EMA weights
        assert torch.equal(ckpt["state_dict"][key], value), key
    for a, b in zip(ckpt["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def step_of(path: Path) -> int:
    return int(re.fullmatch(r"step-(\d+)\.ckpt", path.name).group(1))


def wait_for(proc, ready, what: str, timeout: float = 300) -> None:
    """Poll until ``ready()``; the run must still be going (else the kill would test nothing)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.args}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be signalled ({what})"


def resume_auto(run: Path, capsys, *extra: str) -> str:
    """``resume=auto`` in the killed run's directory; returns the checkpoint it continued from."""
    capsys.readouterr()
    train(compose_cfg(run, *EXACT, *extra, "resume=auto"))
    found = re.search(r"resume=auto: continuing from (\S+)", capsys.readouterr().err)
    assert found, "resume=auto did not find a checkpoint"
    return found.group(1)


# ---------------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path, straight, capsys):
    target = random.choice([*range(4, 57), *range(70, 116)])  # well inside an epoch
    proc = start_cli(tmp_path, *EXACT, "checkpoint.every_n_steps=3", f"hydra.run.dir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    wait_for(proc, lambda: any(step_of(p) >= target for p in ckpts.glob("step-*.ckpt")), f"step {target}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    chosen = resume_auto(tmp_path / "run", capsys, "checkpoint.every_n_steps=3")
    assert Path(chosen).name.startswith("step-") and step_of(Path(chosen)) % STEPS_PER_EPOCH, (target, chosen)
    assert_same_training(torch.load(ckpts / "last.ckpt", weights_only=True), straight)


def test_sigkill_after_an_epoch_then_resume_auto_is_exact(tmp_path, straight, capsys):
    proc = start_cli(tmp_path, *EXACT, "checkpoint.every_n_steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    wait_for(proc, (ckpts / "last.ckpt").exists, "the end of epoch 0")
    time.sleep(random.uniform(0, 0.3))  # somewhere in epoch 1
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill"

    newest = find_resume(tmp_path / "run")
    assert load_checkpoint(newest)["global_step"] == STEPS_PER_EPOCH  # the epoch boundary
    assert resume_auto(tmp_path / "run", capsys, "checkpoint.every_n_steps=0") == str(newest)
    assert_same_training(torch.load(ckpts / "last.ckpt", weights_only=True), straight)


# ---------------------------------------------------------------------------------------- SIGTERM/SIGUSR1
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "Ctrl-C", "SIGUSR1"])
def test_preemption_signal_saves_and_the_run_resumes_exactly(tmp_path, straight, capsys, sig):
    target = random.randint(5, 110)
    proc = start_cli(tmp_path, *EXACT, "checkpoint.every_n_steps=5", f"hydra.run.dir={tmp_path / 'run'}")
    ckpts = tmp_path / "run" / "checkpoints"
    wait_for(proc, lambda: any(step_of(p) >= target for p in ckpts.glob("step-*.ckpt")), f"step {target}")
    proc.send_signal(sig)
    ctrl_c = sig == signal.SIGINT  # saves like SIGTERM, says so, exits 130 as an interrupted command does
    assert proc.wait(timeout=120) == 128 + (signal.SIGINT if ctrl_c else signal.SIGTERM)
    err = (tmp_path / "stderr.txt").read_text()
    said = "stopped by Ctrl-C" if ctrl_c else "preempted"
    assert re.search(rf"{said} at step \d+: saved .*preempted\.ckpt; to continue, run the same command with "
                     rf"resume=auto hydra.run.dir=", err)
    saved = load_checkpoint(ckpts / "preempted.ckpt")
    assert target <= saved["global_step"] < 2 * STEPS_PER_EPOCH

    assert Path(resume_auto(tmp_path / "run", capsys, "checkpoint.every_n_steps=5")).name == "preempted.ckpt"
    assert_same_training(torch.load(ckpts / "last.ckpt", weights_only=True), straight)


def test_sigusr1_is_handled_as_sigterm_outside_slurm(monkeypatch):
    """SIGUSR1's default action kills the process; during training it must mean "save and stop" like SIGTERM."""
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with StopSignals(compose_cfg(Path("/tmp"), *TINY)):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)  # the handlers run between bytecodes
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored after training
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_slurm_requeue_signal_saves_and_requeues(tmp_path):
    """Under SLURM, Lightning's auto-requeue owns SIGUSR1 (preemption.requeue=true): an hpc checkpoint and
    ``scontrol requeue <job>``, here a stand-in that records its arguments; SIGTERM then saves and exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = dict(SLURM_NTASKS="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="4242", SLURM_NODELIST="localhost",
                 SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", PATH=f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "run"
    proc = start_cli(tmp_path, *EXACT, "checkpoint.every_n_steps=5", f"hydra.run.dir={run}", env=slurm)
    wait_for(proc, lambda: any((run / "checkpoints").glob("step-*.ckpt")), "the first step checkpoint")
    proc.send_signal(signal.SIGUSR1)
    wait_for(proc, (tmp_path / "scontrol.args").exists, "the requeue")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert load_checkpoint(run / "hpc_ckpt_1.ckpt")["global_step"] > 0
    assert load_checkpoint(run / "checkpoints" / "preempted.ckpt")["global_step"] > 0


# ------------------------------------------------------------------------------------- corrupt checkpoints
def test_truncated_newest_checkpoints_fall_back_to_the_previous_one(tmp_path, straight, capsys):
    run = tmp_path / "run"
    train(compose_cfg(run, *EXACT, "trainer.max_epochs=1", "schedule.total_epochs=2", "checkpoint.every_n_steps=10",
                      "checkpoint.keep=3"))
    ckpts = run / "checkpoints"
    newest = [p for p in ckpts.glob("*.ckpt") if load_checkpoint(p)["global_step"] == STEPS_PER_EPOCH]
    assert {p.name for p in newest} == {"last.ckpt", "best.ckpt", "best_ema.ckpt"}
    for path in newest:  # what a crash in the middle of writing them would leave without atomic saves
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint, truncated or corrupt"):
        load_checkpoint(ckpts / "last.ckpt")

    with pytest.warns(UserWarning, match=r"truncated or corrupt .*; falling back to the previous checkpoint"):
        chosen = resume_auto(run, capsys, "checkpoint.every_n_steps=10", "checkpoint.keep=3")
    assert Path(chosen).name == "step-60.ckpt"
    assert_same_training(torch.load(ckpts / "last.ckpt", weights_only=True), straight)


def test_last_checkpoint_is_written_every_epoch_even_without_improvement(tmp_path, monkeypatch):
    """Lightning 2.6's save_last follows the best checkpoint; an epoch that does not improve must still be saved."""
    # the monitored metric improves in no epoch after the first
    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k", lambda self, trainer, current=None:
                        not self.best_model_path)
    train(compose_cfg(tmp_path, *TINY, "trainer.max_epochs=2"))
    ckpts = tmp_path / "checkpoints"
    assert load_checkpoint(ckpts / "best.ckpt")["global_step"] == 512 // 64
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 2 * 512 // 64


def test_resume_auto_on_a_finished_run_keeps_its_metrics(tmp_path, capsys):
    train(compose_cfg(tmp_path, *TINY))
    before = (tmp_path / "metrics.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    capsys.readouterr()
    again = train(compose_cfg(tmp_path, *TINY, "resume=auto"))  # e.g. a requeued job that had in fact finished
    assert "nothing left to train" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == before and again["final"]
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}


def test_resume_auto_in_an_empty_run_directory_starts_afresh(tmp_path, capsys):
    result = train(compose_cfg(tmp_path, *TINY, "resume=auto"))
    assert "resume=auto: no checkpoint yet, starting afresh" in capsys.readouterr().err
    assert result["steps"] == 512 // 64


def test_flipped_bits_are_caught_by_the_checksums(tmp_path):
    """torch.load reads a flipped byte in a tensor silently; resume=auto checks each record's CRC-32 first."""
    ckpts = tmp_path / "checkpoints"
    save_weights({"w": torch.arange(4096.0)}, ckpts / "a.ckpt")
    flipped = ckpts / "b.ckpt"
    save_weights({"w": torch.arange(4096.0)}, flipped)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes
    flipped.write_bytes(bytes(data))
    assert not torch.equal(load_checkpoint(flipped)["w"], torch.arange(4096.0))  # what torch alone would give
    with pytest.raises(CheckpointError, match=r"corrupt \(checksum mismatch in \S+/data/0\)"):
        load_checkpoint(flipped, verify=True)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert find_resume(tmp_path) is None  # a.ckpt loads but is no training checkpoint: nothing to resume


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_weights({"w": torch.ones(3)}, tmp_path / "w.pth")
    path.write_bytes((tmp_path / "w.pth").read_bytes())

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "w.pth"]  # no temporary file left


# ---------------------------------------------------------------------------------------- unsafe pickles
class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickles_are_refused_everywhere_and_never_run(tmp_path):
    marker = tmp_path / "payload_ran"
    run = tmp_path / "trained"
    train(compose_cfg(run, *TINY))
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    evil_ckpt = tmp_path / "evil.ckpt"
    torch.save({**good, "callbacks": Payload(marker)}, evil_ckpt)  # a real checkpoint plus one poisoned entry
    evil_pth = tmp_path / "evil.pth"
    with open(evil_pth, "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f, protocol=2)  # a plain pickle, no torch zip container

    refused = r"refused: loading it would run code \(posix\.system\); .* nothing in the file was run"
    with pytest.raises(UnsafeCheckpointError, match=f"resume='{evil_ckpt}': {refused}"):
        train(compose_cfg(tmp_path / "a", *TINY, f"resume={evil_ckpt}"))
    with pytest.raises(UnsafeCheckpointError, match=f"ckpt_path='{evil_ckpt}': {refused}"):
        evaluate(compose_cfg(tmp_path / "b", *TINY, "mode=eval", f"ckpt_path={evil_ckpt}"))
    with pytest.raises(ConfigError, match=f"finetune.from_ckpt='{evil_pth}': {refused}"):
        train(compose_cfg(tmp_path / "c", *TINY, f"finetune.from_ckpt={evil_pth}"))
    planted = run / "checkpoints" / "zz_newest.ckpt"  # planted in a run directory: resume=auto refuses it too
    os.replace(evil_ckpt, planted)
    with pytest.raises(UnsafeCheckpointError, match=f"resume=auto: checkpoint='{planted}': {refused}"):
        train(compose_cfg(run, *TINY, "resume=auto"))
    assert not marker.exists()

    result = run_cli(tmp_path, *TINY, f"finetune.from_ckpt={evil_pth}", f"hydra.run.dir={tmp_path / 'd'}")
    assert result.returncode == 2 and not marker.exists()
    assert re.fullmatch(f"error: finetune.from_ckpt='{evil_pth}': {refused}\n", result.stderr), result.stderr


def test_safetensors_export_and_import(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg(run, *TINY, "checkpoint.export_format=safetensors"))
    exported = run / "checkpoints" / "ema_weights.safetensors"
    assert exported.read_bytes()[8:9] == b"{"  # a JSON header, no pickle
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    ema = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    loaded = read_state_dict(exported).state
    assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], v) for k, v in ema.items())
    result = train(compose_cfg(tmp_path / "ft", *TINY, f"finetune.from_ckpt={exported}", "checkpoint.save=false"))
    assert result["steps"] == 512 // 64


# -------------------------------------------------------------------------------------------- numerics
NAN = ["optimizer.lr=1e30", "schedule.warmup_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep=5"]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """A learning rate of 1e30 (reached after the warmup's first step) blows the weights up; the next loss is NaN."""
    with pytest.raises(NonFiniteError) as err:
        train(compose_cfg(tmp_path, *TINY, *NAN))
    message = str(err.value)
    found = re.fullmatch(r"nonfinite=stop: the loss is nan at step (\d+) \(epoch 0, batch \d+\); training stopped "
                         r"before this update; the checkpoints are kept, the newest is (\S+); lower optimizer.lr, or "
                         r"set nonfinite=skip to skip such steps", message)
    assert found, message
    step, newest = int(found.group(1)), Path(found.group(2))
    kept = load_checkpoint(newest, verify=True)  # every record matches its CRC: written whole
    assert kept["global_step"] == step
    assert all(v.isfinite().all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")) and not (tmp_path / "metrics.json").exists()


def test_nonfinite_skip_counts_and_finishes(tmp_path):
    result = train(compose_cfg(tmp_path, *TINY, *NAN, "nonfinite=skip"))
    assert result["steps"] == 512 // 64 and result["nonfinite_skipped"] == result["steps"] - 2
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["nonfinite_skipped"] == result["nonfinite_skipped"]
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())


class NaNGradientOnce(Callback):
    """The gradient of one parameter turns NaN in batch 3 (the loss stays finite)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            param = next(pl_module.net.parameters())
            handle = param.register_hook(lambda grad: handle.remove() or grad * float("nan"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_gradient_is_caught_before_the_update(tmp_path, monkeypatch, policy):
    import vittm.tasks.run

    original = vittm.tasks.run.checkpoint_callbacks
    monkeypatch.setattr(vittm.tasks.run, "checkpoint_callbacks", lambda *a: [*original(*a), NaNGradientOnce()])
    cfg = compose_cfg(tmp_path, *TINY, f"nonfinite={policy}")
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"^nonfinite=stop: the gradient norm is nan at step 3 \(epoch 0, "
                                                 r"before the optimizer step\); training stopped before this update"):
            train(cfg)
        return
    result = train(cfg)
    assert result["nonfinite_skipped"] == 1 and result["steps"] == 512 // 64
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_nonfinite_weights_are_never_saved():
    module = ClassificationModule(model=dict(name="vittm_test", num_classes=4), optimizer=dict(opt="adamw", lr=1e-3),
                         schedule=dict(name="cosine", warmup_steps=0), loss=dict(name="ce"))
    with torch.no_grad():
        next(module.net.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the weights are not finite at step 0 \(net\..*this checkpoint was "
                                             r"not written, the previous one is kept"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


# ------------------------------------------------------------------------------------------- bad images
def broken_folder(root: Path) -> tuple[Path, list[Path]]:
    """An ImageFolder with one empty file, one truncated JPEG and one text file named .JPEG among 24 train images."""
    make_image_folder(root, ("train", "val"), ["a", "b"], per_class=12)
    bad = [root / "train" / "a" / "img_0.JPEG", root / "train" / "b" / "img_1.JPEG", root / "val" / "a" / "img_2.JPEG"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(bad[1].read_bytes()[:200])
    bad[2].write_text("not an image")
    return root, bad


FOLDER = ["data=imagefolder", "data.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]", "model.img_size=28",
          "data.batch_size=8", "data.num_workers=2", "data.train_subset=null", "data.val_subset=null", "augment=none",
          "data.val_split=0"]  # train/ and val/ as they are: the bad files stay where the test put them


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, capsys, workers):
    """Counted across worker processes through the run's bad_images.txt (under pytest a worker's warnings stay in
    that worker: pytest records them there; run.py prints them to stderr)."""
    root, bad = broken_folder(tmp_path / "folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(compose_cfg(tmp_path / "run", *TINY, *FOLDER, f"data.root={root}",
                                   f"data.num_workers={workers}"))
    warned = {m.group(1) for w in caught if (m := re.search(r"skipping unreadable image '([^']+)'", str(w.message)))}
    assert warned == ({str(p) for p in bad} if workers == 0 else set())
    assert result["bad_images"] == 3 and result["steps"] == 24 // 8
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert {line.split("\t")[0] for line in listed.splitlines()} == {str(p) for p in bad}
    assert "skipped 3 unreadable images (listed in" in capsys.readouterr().out


def test_unreadable_image_fails_naming_the_file(tmp_path):
    root, bad = broken_folder(tmp_path / "folder")
    for p in bad[:2]:  # only the text file among the validation images is left (validation reads every image)
        p.unlink()
    with pytest.raises(UnreadableImageError) as err:  # raised in a worker process, one clean line here
        train(compose_cfg(tmp_path / "run", *TINY, *FOLDER, f"data.root={root}", "data.on_bad_image=fail"))
    assert str(err.value) == (
        f"data.on_bad_image=fail: cannot read '{bad[2]}' (cannot identify image file '{bad[2]}'); remove or replace "
        f"the file, or set data.on_bad_image=skip to skip unreadable images"
    )


# ------------------------------------------------------------------------------------------ validation
def test_new_settings_are_validated_one_line_each(tmp_path):
    cfg = compose_cfg(tmp_path, *TINY, "resume=/no/such.ckpt", "nonfinite=ignore", "checkpoint.every_n_steps=-1",
                      "checkpoint.keep=0", "checkpoint.export_format=npz", "preemption.requeue=maybe", "seed=-1",
                      "data.on_bad_image=retry", "model.memory_ps=5", "model.process_ps=6", "compile=fast")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).splitlines() == [
        "seed=-1: must be an integer >= 0",
        "resume='/no/such.ckpt': file does not exist (or use resume=auto: the newest checkpoint of the run directory)",
        "nonfinite='ignore': choose one of ['stop', 'skip']",
        "compile='fast': true, false or a torch.compile mode: ['default', 'reduce-overhead', 'max-autotune', "
        "'max-autotune-no-cudagraphs']",
        "preemption.requeue='maybe': true or false",
        "checkpoint.every_n_steps=-1: an integer >= 0 (0: only per epoch)",
        "checkpoint.keep=0: an integer >= 1 (periodic checkpoints kept)",
        "checkpoint.export_format='npz': choose one of ['safetensors', 'pth']",
        "data.on_bad_image='retry': choose one of ['skip', 'fail']",
        "model.img_size=28: not divisible by model.memory_ps=5; both patch sizes must divide it",
        "model.img_size=28: not divisible by model.process_ps=6; both patch sizes must divide it",
    ]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("overrides", "line"), [
    (["model.num_heads=3"], "model.num_heads=3: must divide model.embed_dim=32 (each head gets embed_dim / num_heads "
     "channels)"),
    (["rw_head.latent_size_scale=3"],
     "model.rw_head.latent_size_scale=3 (rw_head.latent_size_scale): must divide model.embed_dim=32"),
    (["trainer.accumulate_grad_batches=16"], "data.batch_size=64: 64 x trainer.accumulate_grad_batches=16 x "
     "trainer.devices=1 x trainer.num_nodes=1 = 1024 images per optimizer step, more than the 512 training images; "
     "lower them (or use more data)"),
    (["model.num_classes=5"], "model.num_classes=5: the data has 10 classes; leave it to the data "
     "(model.num_classes=${data.num_classes})"),
], ids=["heads", "latent-scale", "batch-vs-data", "classes-model-vs-data"])
def test_model_and_data_size_problems_before_training(tmp_path, overrides, line):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(tmp_path, *TINY, *overrides))
    assert str(err.value) == line
    assert not (tmp_path / "checkpoints").exists()
