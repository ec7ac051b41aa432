"""The LightningModule: both heads' losses summed (SPEC §3), EMA, mixup/cutmix, metrics, optimizer and schedule.

Every constructor argument is a plain dict or scalar and is saved with ``save_hyperparameters()``, so
``ViTTMModule.load_from_checkpoint(path)`` needs nothing else. Library pieces do the work: timm's model EMA, Mixup,
losses, optimizer and scheduler factories; torchmetrics for accuracy.

Metric names: ``train/loss``, ``val/memory_acc1``, ``val/process_acc5``, ``val_ema/memory_acc1``, ... and
``val/acc1``/``val/acc5`` for what ``model(x)`` returns (the ``eval_head`` of a ViTTM, the logits of a baseline).

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
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vittm.errors import ConfigError
from vittm.models import ViTTM, WeightsReport, create_model, load_weights

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


class ViTTMModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        loss: dict[str, Any],
        augment: dict[str, Any] | None = None,
        ema: dict[str, Any] | None = None,
        freeze: str = "none",
        compile: bool | str = False,
        log_grad_norm: bool = False,
        nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={nonfinite!r}: choose one of {list(NONFINITE)}")
        self.save_hyperparameters()
        self.fit_plan: dict[str, Any] | None = None  # warmup and EMA decay as fitted to the run (fit_to_run)
        self.nonfinite_skipped = 0  # updates skipped for a non-finite loss or gradient (kept in checkpoints)
        self.net = create_model(**model)
        apply_freeze(self.net, freeze)
        self.num_classes = model["num_classes"]
        self.two_heads = isinstance(self.net, ViTTM)
        self.ema = self._new_ema()
        self.set_compile(compile)

        aug = augment or {}
        mixing = aug.get("mixup", 0) > 0 or aug.get("cutmix", 0) > 0
        smoothing = loss.get("label_smoothing", 0.0)
        self.mixup = Mixup(
            mixup_alpha=aug.get("mixup", 0.0), cutmix_alpha=aug.get("cutmix", 0.0), prob=aug.get("mix_prob", 1.0),
            switch_prob=0.5, mode="batch", label_smoothing=smoothing, num_classes=self.num_classes,
        ) if mixing else None
        if loss["name"] == "bce":
            self.criterion = BinaryCrossEntropy(
                smoothing=0.0 if mixing else smoothing,  # Mixup already smoothed the targets
                target_threshold=loss.get("target_threshold"), sum_classes=loss.get("sum_classes", False),
            )
        elif mixing:
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)

        k = min(5, self.num_classes)
        self.metrics = nn.ModuleDict()
        prefixes = ("val", "val_ema", "test", "test_ema") if self.ema is not None else ("val", "test")
        for prefix in prefixes:
            for head in self.head_names + [""]:
                for top in (1, 5):
                    self.metrics[self.metric_key(prefix, head, top)] = MulticlassAccuracy(
                        self.num_classes, top_k=min(top, k), average="micro"
                    )
            self.metrics[f"{prefix}|loss"] = MeanMetric()

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def head_names(self) -> list[str]:
        return ["memory", "process"] if self.two_heads else []

    @property
    def supervised_heads(self) -> list[str]:
        """The heads whose losses are summed: both (SPEC §3), or one (``loss.heads=memory``: the supervision of a
        one-head ViT, for matched comparisons); a baseline's only output is ``""``."""
        chosen = self.hparams.loss.get("heads", "all")
        return (self.head_names if chosen == "all" else [chosen]) if self.two_heads else [""]

    @staticmethod
    def metric_key(prefix: str, head: str, top: int) -> str:
        return f"{prefix}|{head + '_' if head else ''}acc{top}"  # ModuleDict keys cannot hold "/"

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

    def _logits(self, net: nn.Module, x: torch.Tensor) -> Any:
        return net.forward_both(x) if self.two_heads else net(x)

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

    def outputs(self, x: torch.Tensor, ema: bool = False) -> dict[str, torch.Tensor]:
        """Logits by head name, plus ``""`` for what ``model(x)`` returns; of the EMA model with ``ema``."""
        raw = self._call(self.__dict__["_run_ema" if ema else "_run"], x)
        if not self.two_heads:
            return {"": raw}
        memory, process = raw
        evaluated = {"memory": memory, "process": process, "mean": (memory + process) / 2}[self.net.eval_head]
        return {"memory": memory, "process": process, "": evaluated}

    def load_pretrained(self, path: str) -> WeightsReport:
        """Fine-tuning start: the weights in ``path`` (any format vittm.models.loading reads; the EMA weights of a
        checkpoint that has them), both heads kept if their class count is the data's, else fresh; the EMA restarts
        from the loaded weights."""
        report = load_weights(self.net, path, key="finetune.from_ckpt")
        apply_freeze(self.net, self.hparams.freeze)
        self.ema = self._new_ema()
        return report

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        out = self.outputs(x)
        losses = {h: self.criterion(out[h], target) for h in self.supervised_heads}
        loss = sum(losses.values())
        if self.nonfinite_found("loss", loss, f"batch {batch_idx}"):
            return None  # Lightning skips backward and this micro-batch's share of the update
        self.log("train/loss", loss, prog_bar=True)
        if self.two_heads:
            self.log_dict({f"train/{h}_loss": v for h, v in losses.items()})
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

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

    # --------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        self._score(batch, "test")  # the test split, once at the end (vittm.data.datamodule: three splits)

    def _score(self, batch: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        """Top-1/top-5 of every head and the loss, live and EMA, logged as ``<stage>/...`` and ``<stage>_ema/...``."""
        if batch is None:  # every image of this batch was unreadable (vittm.data.bad_images)
            return
        x, y = batch
        nets = [(stage, False)] + ([(f"{stage}_ema", True)] if self.ema is not None else [])
        for prefix, ema in nets:
            out = self.outputs(x, ema)
            heads = self.head_names or [""]
            # weighted by batch size: the mean over images, whatever the batches and ranks
            self.metrics[f"{prefix}|loss"].update(sum(F.cross_entropy(out[h], y) for h in heads), weight=len(y))
            for head, logits in out.items():
                for top in (1, 5):
                    self.metrics[self.metric_key(prefix, head, top)].update(logits, y)
        for key, metric in self.metrics.items():  # logged as Metric objects: Lightning syncs, computes and resets
            if key.split("|")[0] in (stage, f"{stage}_ema"):
                self.log(key.replace("|", "/"), metric, on_step=False, on_epoch=True, prog_bar=key == f"{stage}|acc1")

    # ---------------------------------------------------------------------------------- optimizer, schedule
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


def ema_state_dict(module: ViTTMModule) -> Mapping[str, torch.Tensor]:
    """The EMA weights (or the live ones without EMA) as a plain model state dict."""
    return (module.ema.module if module.ema is not None else module.net).state_dict()
