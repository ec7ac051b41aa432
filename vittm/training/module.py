"""The LightningModule base every task builds on: EMA, optimizer and schedule, numerics, compile, freezing.

A task (vittm.tasks.classification, vittm.tasks.segmentation) subclasses ``TrainingModule``: it builds ``self.net``,
calls ``self.init_training()``, and defines ``_logits(net, x)`` (what a forward returns), its losses, metrics and
steps. Everything below is the same for every task. Library pieces do the work: timm's model EMA, optimizer and
scheduler factories.

Numerics (``nonfinite``): a non-finite loss or gradient norm either stops the run with ``NonFiniteError`` naming the
step, before the optimizer touches the weights (``stop``), or skips that update and counts it
(``skip``, ``train/nonfinite_skipped``). A checkpoint is never written with non-finite weights, so the last one on
disk stays the last good one.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from vittm.core.errors import ConfigError

NONFINITE = ("stop", "skip")


class NonFiniteError(ConfigError):
    """A non-finite loss, gradient or weight (``nonfinite=stop``): the message names the step."""

# Trainable parameter names per freeze mode (everything else is frozen); "none" trains all.
TRAINABLE = {
    "embeddings": None,  # the inverse: freeze the patch embeddings and position tables, train the rest
    "head_only": r"^(head|process_head|fc_norm|process_fc_norm)\.",
    "peft": r"^(head|process_head|fc_norm|process_fc_norm)\.|^layers\.\d+\.(read|write)\.|pos_embed",
}
EMBEDDINGS = r"^(memory_embed|process_embed|memory_pos_embed|process_pos_embed|patch_embed|pos_embed|cls_token)"


def apply_freeze(net: nn.Module, mode: str) -> None:
    """``none`` | ``embeddings`` | ``head_only`` | ``peft`` (read/write heads, every norm, positions, heads)."""
    if mode == "none":
        return
    norms = {f"{n}.{p}" for n, m in net.named_modules() if isinstance(m, nn.LayerNorm) for p, _ in m.named_parameters()}
    for name, param in net.named_parameters():
        if mode == "embeddings":
            param.requires_grad_(not re.match(EMBEDDINGS, name))
        else:
            param.requires_grad_(bool(re.search(TRAINABLE[mode], name)) or (mode == "peft" and name in norms))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def is_compile_setting(value: Any, auto: bool = False) -> bool:
    """false, true or a torch.compile mode; with ``auto``, also ``"auto"`` (see ``resolve_compile``)."""
    return isinstance(value, bool) or value in COMPILE_MODES or (auto and value == "auto")


def resolve_compile(setting: bool | str, cuda: bool) -> bool | str:
    """``auto``: the fastest setting measured on that kind of device (README "Performance"): CUDA graphs
    (``reduce-overhead``) on a GPU, eager on CPU; any other setting as it is."""
    if setting == "auto":
        return "reduce-overhead" if cuda else False
    return setting


def compile_options(compile: bool | str, **extra: Any) -> dict[str, Any] | None:
    """``compile`` as the configs give it (false, true or a torch.compile mode) -> torch.compile kwargs, or None.
    ``reduce-overhead`` replays CUDA graphs: on a GPU a ViTTM's many small kernels are launch-bound without them."""
    if compile is False:
        return None
    return {"mode": None if compile is True else compile, **extra}


class TrainingModule(L.LightningModule):
    """What every task shares. A subclass sets ``self.net`` (the trained network), then calls ``init_training``;
    it defines ``_logits(net, x)``, ``training_step``/``validation_step``/``test_step`` and its metrics.
    ``self.hparams`` must hold ``optimizer``, ``schedule``, ``ema``, ``freeze``, ``compile``, ``log_grad_norm`` and
    ``nonfinite`` (the subclass's ``save_hyperparameters()`` records them with its own arguments)."""

    def init_training(self) -> None:
        if self.hparams.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={self.hparams.nonfinite!r}: choose one of {list(NONFINITE)}")
        self.fit_plan: dict[str, Any] | None = None  # warmup and EMA decay as fitted to the run (fit_to_run)
        self.nonfinite_skipped = 0  # updates skipped for a non-finite loss or gradient (kept in checkpoints)
        apply_freeze(self.net, self.hparams.freeze)
        self.ema = self._new_ema()
        self.set_compile(self.hparams.compile)

    def _logits(self, net: nn.Module, x: torch.Tensor) -> Any:
        raise NotImplementedError  # the task's forward: logits, or a tuple of them

    def training_loss(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Log ``train/loss`` and the learning rate; False (skip this micro-batch) when the loss is not finite."""
        if self.nonfinite_found("loss", loss, f"batch {batch_idx}"):
            return False
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return True

    def _new_ema(self) -> ModelEmaV3 | None:
        cfg = self.hparams.ema or {}
        if not cfg.get("enabled", True):
            return None
        # timm's V3 copy keeps requires_grad (DDP would call those parameters unused) and sits in eval mode
        # (Lightning switches modes itself, eval for validation, and warns about eval modules at the start of fit).
        return ModelEmaV3(self.net, decay=cfg.get("decay", 0.999)).requires_grad_(False).train()

    def set_compile(self, compile: bool | str) -> None:
        """torch.compile the live model's and the EMA model's forward (``compile``: false, true or a mode).

        The compiled callables are kept outside the module tree, so checkpoints stay the same either way. Under
        ``reduce-overhead`` both replay CUDA graphs, whose outputs live in memory the next replay reuses: each
        call starts a new graph step (``torch.compiler.cudagraph_mark_step_begin``) and its outputs are copied
        out, so the live and the EMA model's logits (validated side by side), and the micro-batches of gradient
        accumulation, never overwrite each other."""
        options = compile_options(compile)
        self.cuda_graphs = bool(options) and options["mode"] == "reduce-overhead"
        live, ema = self._forward_raw, self._forward_ema
        self.__dict__["_run"] = torch.compile(live, **options) if options else live
        self.__dict__["_run_ema"] = torch.compile(ema, **options) if options else ema

    def _forward_raw(self, x: torch.Tensor) -> Any:
        return self._logits(self.net, x)

    def _forward_ema(self, x: torch.Tensor) -> Any:
        return self._logits(self.ema.module, x)

    def _call(self, runner: Callable, x: torch.Tensor) -> Any:
        if not self.cuda_graphs:
            return runner(x)
        torch.compiler.cudagraph_mark_step_begin()
        out = runner(x)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable | None = None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # once per optimizer step, after the update (not per accumulated micro-batch); no gradient at all means the
        # update was skipped (non-finite), and then the EMA must not move either
        updated = any(p.grad is not None for p in self.net.parameters())
        if self.ema is not None and updated:
            self.ema.update(self.net, step=self.global_step)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        # Under 16-mixed the GradScaler expects occasional inf gradients and skips those steps itself.
        check = self.trainer.precision != "16-mixed"
        if not grads or not (check or self.hparams.log_grad_norm):
            return
        norm = torch.nn.utils.get_total_norm(grads)  # one norm for both the check and the log
        if check and self.nonfinite_found("gradient norm", norm, "before the optimizer step"):
            for p in self.net.parameters():  # optimizers leave parameters without a gradient untouched
                p.grad = None
        elif self.hparams.log_grad_norm:
            self.log("train/grad_norm", norm)

    def nonfinite_found(self, what: str, value: torch.Tensor, where: str) -> bool:
        """True when ``value`` is not finite on any rank (all ranks then skip together); raises under ``stop``."""
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(value).all()), all=False)
        if not bad:
            return False
        if self.hparams.nonfinite == "stop":
            raise NonFiniteError(
                f"nonfinite=stop: the {what} is {value.item() if value.numel() == 1 else 'not finite'} at step "
                f"{self.global_step} (epoch {self.current_epoch}, {where}); training stopped before this update"
            )
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
        return True


    def configure_optimizers(self) -> dict[str, Any]:
        o = dict(self.hparams.optimizer)
        opt = create_optimizer_v2(
            self.net, opt=o.pop("opt"), lr=o.pop("lr"), weight_decay=o.pop("weight_decay", 0.0),
            filter_bias_and_bn=o.pop("exclude_norm_bias_pos", True), layer_decay=o.pop("layer_decay", None), **o,
        )
        total = int(self.trainer.estimated_stepping_batches)
        planned = self.hparams.schedule.get("total_epochs")
        by_epochs = self.trainer.max_steps in (-1, None) and (self.trainer.max_epochs or 0) > 0
        if planned and by_epochs:  # a run meant to stop early: the schedule keeps its planned length
            total = total * planned // self.trainer.max_epochs
        total = max(1, total)
        self.fit_plan = fit_to_run(self.hparams.schedule, self.hparams.ema or {}, total)
        notes = self.fit_plan.pop("notes")
        if self.trainer.is_global_zero:  # on the console, not only in run.log: the run differs from its recipe
            for line in notes:
                print(line, file=sys.stderr)
        if self.ema is not None:
            self.ema.decay = self.fit_plan["ema_decay"]
        sched = build_scheduler(opt, {**self.hparams.schedule, "warmup_steps": self.fit_plan["warmup_steps"]}, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers count optimizer steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A huge step can leave the weights inf with a finite loss; such a checkpoint must not replace a good one.
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise NonFiniteError(
                f"nonfinite: the weights are not finite at step {self.global_step} ({', '.join(bad[:3])}, ...); "
                f"this checkpoint was not written, the previous one is kept"
            )
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)
        # A checkpoint written by a tool that compiled the module in place carries "_orig_mod." in its keys.
        state = checkpoint.get("state_dict", {})
        if any("_orig_mod." in k for k in state):
            checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def fit_to_run(schedule: Mapping[str, Any], ema: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """Warmup and EMA decay that fit a run of ``total_steps`` optimizer steps, with a console line for each change.

    A recipe's 200 warmup steps in a 40-step run would put the peak learning rate on the last step and never decay
    it; an EMA of decay 0.999 averages over ~1,000 steps, so over 40 it is mostly the initial weights. So the warmup
    is cut to ``schedule.max_warmup_fraction`` of the run and the EMA's horizon 1/(1 - decay) to
    ``ema.max_horizon_fraction`` of it; a long run keeps its recipe's values (the default run: 200 of 3,432 steps,
    decay 0.999 = 1,000 of 3,432). Set either fraction to 1 to keep the recipe's value whatever the run's length.
    """
    notes = []
    warmup = int(schedule["warmup_steps"])
    fraction = schedule.get("max_warmup_fraction", 1.0)
    cap = int(fraction * total_steps)
    if fraction < 1 and warmup > cap:
        notes.append(f"schedule: {warmup} warmup steps do not fit a run of {total_steps} optimizer steps; warming up "
                     f"over {cap} (schedule.max_warmup_fraction={schedule.get('max_warmup_fraction')}), then decaying")
        warmup = cap
    decay = float(ema.get("decay", 0.0)) if ema.get("enabled") else None
    if decay is not None and ema.get("max_horizon_fraction", 1.0) < 1:
        horizon = max(1.0, ema.get("max_horizon_fraction", 1.0) * total_steps)
        if 1 / (1 - decay) > horizon:
            fitted = round(1 - 1 / horizon, 6)
            notes.append(f"ema: decay {decay} averages over ~{1 / (1 - decay):.0f} steps, more than this run's "
                         f"{total_steps} allow; using {fitted} (ema.max_horizon_fraction="
                         f"{ema.get('max_horizon_fraction')})")
            decay = fitted
    return {"total_steps": total_steps, "warmup_steps": warmup, "ema_decay": decay, "notes": notes}


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any], total_steps: int) -> Any:
    """timm's cosine / poly schedule in optimizer steps: linear warmup from ``warmup_lr`` to the optimizer's lr over
    ``warmup_steps``, then decay to ``min_lr`` at ``total_steps`` (SPEC §9)."""
    warmup = min(int(schedule["warmup_steps"]), total_steps - 1)
    common = dict(
        t_initial=max(1, total_steps - warmup), lr_min=schedule.get("min_lr", 0.0), warmup_t=warmup,
        warmup_lr_init=schedule.get("warmup_lr", 0.0), warmup_prefix=True, t_in_epochs=False,
    )
    if schedule["name"] == "cosine":
        return CosineLRScheduler(optimizer, **common)
    return PolyLRScheduler(optimizer, power=schedule.get("power", 0.9), **common)


def ema_state_dict(module: TrainingModule) -> Mapping[str, torch.Tensor]:
    """The EMA weights (or the live ones without EMA) as a plain model state dict."""
    return (module.ema.module if module.ema is not None else module.net).state_dict()
