"""The LightningModule: one training step = model -> task losses -> balancer -> optimiser step.

Weighting balancers train with Lightning's automatic optimisation (clipping, accumulation and AMP
are Lightning's). Balancers that declare `needs_task_gradients` switch the module to manual
optimisation, with the step of `engine.task_gradients`; gradient clipping and accumulation are
then done here, with the same meaning (the CLI moves `trainer.gradient_clip_val`,
`gradient_clip_algorithm` and `accumulate_grad_batches` into the module for them).

Logs `train/<task>/loss`, `train/weights/<task>`, for gradient balancers `train/grad_norm/<task>`
and `train/grad_cos/<a>-<b>` (the task gradients' pairwise cosine: negative = conflict),
`val/<task>/loss` and `val/<task>/<metric>` (split-level metrics reduced across processes by
torchmetrics' summed states).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import Metric

from mtl_vision.balancing import Balancer
from mtl_vision.constants import ORIGINAL_SIZE_KEY
from mtl_vision.data.sampling import SKIPPED_KEY
from mtl_vision.engine.callbacks import logs_this_step
from mtl_vision.engine.checkpoint import RNG_KEY, restore_rng_states, rng_states
from mtl_vision.engine.guard import NonFiniteGuard, non_finite_keys
from mtl_vision.engine.task_gradients import TaskGradientStep
from mtl_vision.losses import MultiTaskLoss
from mtl_vision.metrics.delta_m import KEY as DELTA_M_KEY
from mtl_vision.metrics.delta_m import DeltaM
from mtl_vision.metrics.functional import stored_at_original_size
from mtl_vision.tasks import check_task_keys, get_task

RUN_INFO_KEY = "mtl_vision"
# what the balancer keeps outside its parameters and buffers (see Balancer.checkpoint_state)
BALANCER_STATE_KEY = "balancer_state"
# the non-finite step counter (see engine.guard)
GUARD_STATE_KEY = "nonfinite_guard"


def raw_at_original_size(preds: Mapping[str, Any], sizes: Sequence[tuple[int, int]], padded: tuple[int, int]) -> dict:
    """Raw outputs (and the "aux" ones) resized bilinearly per image to its own (H, W) of `sizes`
    and padded at the bottom and right to `padded` with zeros (where the targets are ignored): the
    validation loss at the targets' own size."""

    def one(x: Tensor) -> Tensor:
        parts = [
            F.pad(F.interpolate(x[i : i + 1], size=(h, w), mode="bilinear", align_corners=False),
                  (0, padded[1] - w, 0, padded[0] - h))
            for i, (h, w) in enumerate(sizes)
        ]  # fmt: skip
        return torch.cat(parts)

    out = {task: one(x) for task, x in preds.items() if task != "aux"}
    if "aux" in preds:
        out["aux"] = {name: {t: one(x) for t, x in maps.items()} for name, maps in preds["aux"].items()}
    return out


class MultiTaskModule(L.LightningModule):
    """Multi-task training and validation around a `MultiTaskModel`.

    Args:
        model: image (N,3,H,W) -> {task: raw output (N,C,H,W)}.
        loss: {task: raw}, batch -> {task: scalar}.
        balancer: {task: scalar} -> scalar total.
        metrics: {task: Metric} evaluated on validation.
        optimizer: `optimizer(param_groups) -> Optimizer` (a `_partial_` config node).
        scheduler: `scheduler(optimizer, total_steps=...) -> LRScheduler`, stepped every step; optional.
        no_weight_decay_1d: put biases and norm weights in a group without weight decay.
        delta_m: computes `val/delta_m` against single-task baselines when they cover every task.
        expert_aux_weight: weight of the auxiliary losses of mixture-of-experts layers (load
            balancing, mutual information) added to the total training loss.
        expert_stats_every: log the experts' health statistics (usage, dead share, gate entropy)
            every this many training steps (on the first step after that the loggers write), as
            `experts/<module>/<key>`.
        gradient_clip_val, gradient_clip_algorithm, accumulate_grad_batches: the Trainer's
            settings of the same names, applied here when the balancer needs task gradients
            (Lightning does not apply them under manual optimisation).
        max_consecutive_nonfinite: stop the run when this many optimiser steps in a row had a
            non-finite loss or gradient (each one is skipped; see `engine.guard`); 0 never stops.
        run_info: stored in every checkpoint under `RUN_INFO_KEY` so that `mtl-eval` and
            `mtl-predict` can rebuild the model from the file alone: the resolved run config and
            the dataset facts the heads were built from (see `cli.build.run_info`).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss: MultiTaskLoss,
        balancer: Balancer,
        metrics: Mapping[str, Metric],
        optimizer: Callable[[Iterable], Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        no_weight_decay_1d: bool = True,
        delta_m: DeltaM | None = None,
        expert_aux_weight: float = 0.01,
        expert_stats_every: int = 50,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        accumulate_grad_batches: int = 1,
        max_consecutive_nonfinite: int = 25,
        run_info: dict | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(loss.tasks)
        # the tasks with a final prediction; the others are supervised only through the decoder's
        # intermediate predictions (`decoder.auxiliary_tasks`) and have no metrics
        self.eval_tasks = [t for t in self.tasks if t in metrics]
        check_task_keys(metrics, self.eval_tasks, what="metrics")
        if not self.eval_tasks:
            raise ValueError(f"metrics: none of the trained tasks {self.tasks} has a metric")
        final = getattr(model.decoder, "final_tasks", None)
        if final is not None and list(final) != self.eval_tasks:
            raise ValueError(f"the decoder predicts tasks {list(final)} at the end, the metrics are for {self.eval_tasks}")
        if list(balancer.tasks) != self.tasks:
            raise ValueError(f"balancer tasks {balancer.tasks} differ from loss tasks {self.tasks}")
        self.model = model
        self.loss = loss
        self.balancer = balancer
        self.metrics = nn.ModuleDict(dict(metrics))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.no_weight_decay_1d = no_weight_decay_1d
        self.delta_m = delta_m
        self.run_info = run_info
        self.expert_aux_weight = float(expert_aux_weight)
        self.expert_stats_every = int(expert_stats_every)
        self._expert_modules: list[tuple[str, nn.Module]] | None = None
        self._expert_stats_due: int | None = None  # optimiser steps after which the statistics are logged next
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step: int | None = None  # global step whose weights last_val_metrics describe
        balancer.bind(model)
        self.automatic_optimization = not balancer.needs_task_gradients
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.gradient_clip_algorithm = gradient_clip_algorithm or "norm"
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self._task_step: TaskGradientStep | None = None
        self._last_batch: Mapping[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.guard = NonFiniteGuard(max_consecutive=max_consecutive_nonfinite)
        self.skipped_samples = 0  # corrupt training samples replaced (data.skip_corrupt)
        self._last_losses: dict[str, Tensor] = {}

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.model(image)

    def predict_tasks(self, image: Tensor) -> dict[str, Tensor]:
        """Activated predictions in target units (labels, metres, unit normals, probabilities)."""
        raw = self.model(image)
        return {t: get_task(t).activate(raw[t]) for t in self.eval_tasks}

    def _step_losses(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        preds = self.model(batch["image"])
        return preds, self.loss(preds, batch)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        batch_size = batch["image"].shape[0]
        if not self.automatic_optimization:
            total, losses, expert_loss = self._task_gradient_step(batch, batch_idx)
        else:
            _, losses = self._step_losses(batch)
            if hasattr(self.balancer, "grad_scale"):  # GradNorm differentiates the losses itself: AMP scale
                self.balancer.grad_scale = self._loss_scale()[1]
            total = self.balancer(losses)
            expert_loss = self._expert_aux_loss()
            if expert_loss is not None:
                total = total + self.expert_aux_weight * expert_loss
            if self.balancer.needs_losses_after_step:
                self._last_batch = batch
        self._last_losses = {t: v.detach() for t, v in losses.items()}
        if SKIPPED_KEY in batch:
            self.skipped_samples += int(batch[SKIPPED_KEY].sum())
        # only on the steps the loggers write (the progress bar refreshes on those too)
        if not logs_this_step(self._trainer):
            return total if self.automatic_optimization else None
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        if expert_loss is not None:
            self.log("train/experts/aux_loss", expert_loss.detach(), batch_size=batch_size)
        self._maybe_log_expert_stats()
        if SKIPPED_KEY in batch:
            self.log("train/skipped_samples", float(self.skipped_samples), reduce_fx="max", batch_size=batch_size)
        for task in self.tasks:
            self.log(f"train/{task}/loss", losses[task].detach(), batch_size=batch_size)
            if task in self.balancer.last_weights:
                self.log(f"train/weights/{task}", self.balancer.last_weights[task], batch_size=batch_size)
        for key, value in self.loss.last_aux.items():  # "<task>/<aux name>"
            task, name = key.split("/", 1)
            self.log(f"train/{task}/aux/{name}", value, batch_size=batch_size)
        return total if self.automatic_optimization else None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Automatic optimisation: the step, then the balancer's post-step update (FAMO's logits,
        GradNorm's renormalisation), with the losses recomputed on the same batch if it asks."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.balancer.after_step(self._losses_after_step())

    def _losses_after_step(self) -> dict[str, Tensor] | None:
        if not self.balancer.needs_losses_after_step or self._last_batch is None:
            return None
        # the same precision as the training forward (autocast under *-mixed), in train mode as the authors
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            _, losses = self._step_losses(self._last_batch)
            self._expert_aux_loss()  # discard the experts' auxiliary loss of this extra forward
        self._last_batch = None
        return self.balancer.reference_losses(losses)

    def _loss_scale(self) -> tuple[Any, float]:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # scale() initialises the scaler's state on its first call, as in automatic optimisation
            return scaler, float(scaler.scale(torch.ones((), device=self.device)))
        return None, 1.0

    def _task_gradient_step(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[Tensor, dict, Tensor | None]:
        """Manual optimisation for gradient balancers: see `engine.task_gradients`."""
        if self._task_step is None:
            self._task_step = TaskGradientStep(self.model, self.balancer, self.tasks)
        _, scale = self._loss_scale()

        def extra_loss() -> Tensor | None:
            expert = self._expert_aux_loss()
            return None if expert is None else self.expert_aux_weight * expert

        _, losses, extra = self._task_step.micro_batch(
            batch["image"], lambda preds: self.loss(preds, batch), extra_loss,
            scale=scale, divide=self.accumulate_grad_batches,
        )  # fmt: skip
        boundary = (batch_idx + 1) % self.accumulate_grad_batches == 0 or (
            batch_idx + 1 == self.trainer.num_training_batches
        )
        if boundary:
            self._apply_task_gradients(scale)
        total = self.balancer(losses)
        expert_loss = None if extra is None else extra.detach() / self.expert_aux_weight
        return total, losses, expert_loss

    def _apply_task_gradients(self, scale: float) -> None:
        optimizer = self.optimizers()
        finite, _, stats = self._task_step.write_gradients(scale=scale)
        if logs_this_step(self._trainer):
            for key, value in stats.items():
                self.log(f"train/{key}", value)
        if finite and self.gradient_clip_val:
            params = [p for p in self.parameters() if p.grad is not None]
            if self.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val * scale)
            else:
                torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val * scale)
        # a non-finite step goes through too: on_before_optimizer_step drops its gradients, so it
        # moves nothing and is counted as in automatic optimisation (GradScaler skips it as well)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.balancer.after_step(None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        manual = not self.automatic_optimization
        accumulate = self.accumulate_grad_batches if manual else self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # the first micro-batch of an optimiser step
            self.guard.snapshot(self.model)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Every optimisation path and precision passes here with complete (unscaled) gradients:
        a non-finite step is undone (see `engine.guard`)."""
        self.guard.check(self.parameters())
        self._after_guard()

    def _after_guard(self) -> None:
        if logs_this_step(self._trainer):
            self.log("train/skipped_steps", float(self.guard.skipped), reduce_fx="max")
        if self.guard.exhausted:
            losses = {t: float(v) for t, v in self._last_losses.items()}
            lrs = [g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups]
            raise self.guard.error(self.global_step, losses, max(lrs) if lrs else None)

    def on_train_epoch_end(self) -> None:
        self.balancer.on_train_epoch_end()

    def _experts(self) -> list[tuple[str, nn.Module]]:
        """Outermost modules with expert routing (MoE layers, TaskExpert gates): a module that
        delegates to inner ones already sums them, so its descendants are not visited again."""
        if self._expert_modules is None:
            found: list[tuple[str, nn.Module]] = []
            for name, module in self.model.named_modules():
                if any(name.startswith(f"{outer}.") for outer, _ in found):
                    continue
                if hasattr(module, "pop_aux_loss") or hasattr(module, "expert_stats"):
                    found.append((name, module))
            self._expert_modules = found
        return self._expert_modules

    def _expert_aux_loss(self) -> Tensor | None:
        parts = [m.pop_aux_loss() for _, m in self._experts() if hasattr(m, "pop_aux_loss")]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None

    def _maybe_log_expert_stats(self) -> None:
        """On a step the loggers write, once `expert_stats_every` optimiser steps have passed since
        the statistics were last logged (the first time: since the previous multiple of it)."""
        every = self.expert_stats_every
        if every <= 0 or not self._experts():
            return
        done = self.global_step + 1  # optimiser steps completed once this one is
        if self._expert_stats_due is None:
            self._expert_stats_due = (self.global_step // every + 1) * every
        if done >= self._expert_stats_due:
            self._log_expert_stats()
            self._expert_stats_due = done + every

    def _log_expert_stats(self) -> None:
        for name, module in self._experts():
            if hasattr(module, "expert_stats"):
                for key, value in module.expert_stats().items():
                    self.log(f"experts/{name}/{key}", float(value))
                module.reset_expert_stats()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Losses and metric updates of one batch. Targets kept at each image's own size
        (`ORIGINAL_SIZE_KEY`, `MTINetValTransform(targets="original")`) are scored as MTI-Net's
        published numbers are: the metrics receive the maps its `save_model_predictions` stores
        (`stored_at_original_size`), and the losses are those of the raw outputs resized
        bilinearly to each image's size (`raw_at_original_size`)."""
        sizes = batch.get(ORIGINAL_SIZE_KEY)
        if sizes is None:
            preds, losses = self._step_losses(batch)
            scored = {task: get_task(task).activate(preds[task]) for task in self.eval_tasks}
        else:
            preds = self.model(batch["image"])
            sizes = [(int(h), int(w)) for h, w in sizes.tolist()]
            padded = tuple(batch[self.tasks[0]].shape[-2:])
            losses = self.loss(raw_at_original_size(preds, sizes, padded), batch)
            scored = {task: stored_at_original_size(task, preds[task], sizes, padded) for task in self.eval_tasks}
        batch_size = batch["image"].shape[0]
        for task in self.tasks:
            self.log(f"val/{task}/loss", losses[task], sync_dist=True, batch_size=batch_size)
        for task in self.eval_tasks:
            self.metrics[task].update(scored[task], batch[task])
        self.log("val/loss", sum(losses.values()), sync_dist=True, batch_size=batch_size)

    def on_validation_epoch_end(self) -> None:
        results: dict[str, float] = {}
        for task in self.eval_tasks:
            # compute() reduces the summed states over all processes, so every rank logs the
            # split-level value and no further sync is needed.
            for key, value in self.metrics[task].compute().items():
                results[f"val/{task}/{key}"] = float(value)
            self.metrics[task].reset()
        if self.delta_m is not None:
            value = self.delta_m(results, self.eval_tasks)
            if value is not None:
                results[f"val/{DELTA_M_KEY}"] = value
        for key, value in results.items():
            self.log(key, value, sync_dist=False, rank_zero_only=False)
        self.last_val_metrics = results
        self.last_val_step = None if self.trainer.sanity_checking else self.global_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_keys(checkpoint.get("state_dict", {}))
        if bad:
            raise ValueError(
                f"refusing to write a checkpoint at step {self.global_step}: the weights hold inf/NaN in {bad}; "
                "the previous checkpoints are kept"
            )
        checkpoint[GUARD_STATE_KEY] = self.guard.state_dict()
        if self.run_info is not None:
            checkpoint[RUN_INFO_KEY] = self.run_info
        # dropout, drop-path and anything else drawing from the global generators continues where
        # it was (under DDP the ranks draw alike, so rank 0's states stand for all)
        checkpoint[RNG_KEY] = rng_states()
        balancer_state = self.balancer.checkpoint_state()
        if balancer_state is not None:
            checkpoint[BALANCER_STATE_KEY] = balancer_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get(GUARD_STATE_KEY, {}))
        self._rng_to_restore = checkpoint.get(RNG_KEY)
        if BALANCER_STATE_KEY in checkpoint:
            self.balancer.load_checkpoint_state(checkpoint[BALANCER_STATE_KEY])

    def on_train_start(self) -> None:
        # restored here, after everything that runs between loading and the first step (building
        # the loaders, sanity validation) and may draw from the generators
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def configure_optimizers(self) -> Any:
        return self.build_optimizers(
            int(self.trainer.estimated_stepping_batches), self.trainer.max_epochs, self.trainer.max_steps
        )

    def build_optimizers(self, total_steps: int, max_epochs: int | None, max_steps: int) -> Any:
        """The optimiser (and step-wise scheduler, as Lightning's dict) for a run of `total_steps`
        optimiser steps, `max_epochs` epochs or `max_steps` steps (-1: not set), as the Trainer's are."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.no_weight_decay_1d:
            groups = [
                {"params": [p for _, p in params if p.ndim > 1]},
                {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": [p for _, p in params]}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = max(int(total_steps), 1)
        epochs = max_epochs
        # optimiser steps per epoch, for schedules that change the rate once per epoch
        per_epoch = math.ceil(total_steps / epochs) if epochs and epochs > 0 and max_steps < 0 else None
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
