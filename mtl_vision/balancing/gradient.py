"""Gradient balancers: aggregate the per-task gradients of the shared part with a torchjd aggregator.

PCGrad (Yu et al., NeurIPS 2020), IMTL-G (Liu et al., ICLR 2021), UPGrad (Quinton & Rey, 2024),
GradDrop (Chen et al., NeurIPS 2020) and DualProj (after GEM, Lopez-Paz & Ranzato 2017) are
torchjd's aggregators; CAGrad, Nash-MTL, MGDA and Aligned-MTL are ours, after their authors' code
(see below). This class decides what they see:

- `mode: params`: the Jacobian of the task losses with respect to the shared parameters (the
  rows are the per-task gradients, LibMTL's "parameter" gradients).
- `mode: features`: the Jacobian with respect to the shared representation (the backbone's
  feature maps, MGDA-UB / LibMTL "rep_grad"): one backward through the decoder per task, one through
  the backbone for the aggregated gradient, so it costs far less than `params`.

Which parameters are shared is explicit: `shared` lists module prefixes of the model (`backbone` by
default). Parameters outside it, and parameters inside it that only one task uses, get their plain
gradient (the sum of the task losses' gradients).

The authors' versions of Aligned-MTL, MGDA, CAGrad and Nash-MTL are our own weightings
(`balancing.aligned_mtl`, `.mgda`, `.cagrad`, `.nashmtl`, see `balancing.reference`): they may read
the step's losses and give the task heads weights of their own. `heads: weighted` gives every
parameter outside the aggregated set the gradient of sum_t w_t L_t (what the authors get by
back-propagating the weighted loss: MGDA, Nash-MTL); `heads: plain` the plain sum.

What the strategy differentiates: `transform: none` the task losses L_t; `log` log(L_t + 1e-8)
(DB-MTL, LibMTL's `torch.log(losses + 1e-8)`), whose gradients are g_t / (L_t + 1e-8); `learned_scale`
IMTL-L's e^{s_t} L_t - s_t with one learned s_t per task from 0 (LibMTL's IMTL), whose gradients are
e^{s_t} g_t and whose s_t gets e^{s_t} L_t - 1. The aggregation sees the transformed rows, the heads
their transformed gradients (the plain sum of those, or weighted as above), and the weights logged
are those of the untransformed rows. Methods that keep state per shared parameter (DB-MTL, MoCo,
ExcessMTL: `balancing.reference.JacobianAggregator`) run in `mode: params` only.

Distributed and deterministic: the aggregation runs on values that are identical on every process
(the Jacobian averaged across processes, or the Gramian summed across them), and random aggregators
(PCGrad's task order, GradDrop's thresholds) draw from a generator seeded by (seed, step), so every
rank applies the same update, the one a single process computes on the global batch. The training
step itself is `engine.task_gradients`.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchjd import Stateful
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from torchjd.aggregation import NashMTL as TorchJDNashMTL

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.distributed import seeded_rng
from mtl_vision.balancing.reference import JacobianAggregator, ReferenceAggregator

MODES = ("params", "features")
HEADS = ("plain", "weighted")
TRANSFORMS = ("none", "log", "learned_scale")
GRAMIANS = ("per_sample", "batch_sum")
LOG_EPS = 1e-8  # log(L + 1e-8), LibMTL's DB_MTL


def psd_root(gramian: Tensor) -> Tensor:
    """A square matrix M with M M^T = gramian (symmetric PSD, negative round-off clipped)."""
    values, vectors = torch.linalg.eigh(gramian)
    return vectors * values.clamp(min=0).sqrt()


def gramian_stats(gramian: Tensor, tasks: Sequence[str]) -> dict[str, float]:
    """Per-task gradient norms and pairwise cosine similarities (negative = conflict)."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    stats = {f"grad_norm/{t}": float(norms[i]) for i, t in enumerate(tasks)}
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            denom = float(norms[i] * norms[j])
            stats[f"grad_cos/{tasks[i]}-{tasks[j]}"] = float(gramian[i, j]) / denom if denom > 0 else 0.0
    return stats


class GradientBalancer(Balancer):
    """Args:
    tasks: task names.
    aggregator: a torchjd `Aggregator`, or a factory returning one (a `_partial_` config node);
        a factory that takes `n_tasks` (Nash-MTL) gets the number of tasks.
    mode: "params" or "features" (see the module docstring).
    shared: module prefixes of the model whose parameters are shared ("backbone" by default;
        e.g. ["backbone", "decoder"] for cross-task decoders). `mode: features` takes the
        backbone's output as the shared representation and needs `shared == ["backbone"]`.
    seed: seeds the random choices of random aggregators, per optimiser step.
    heads: "plain" (parameters outside the aggregated set get the plain sum of the task
        gradients) or "weighted" (sum_t w_t g_t with the aggregation's head weights).
    features_heads: `heads` under `mode: features`, when it must differ (None: `heads`). Nash-MTL's
        weights solve G w = 1/w, so they grow as G^-1/2: on the small Gramian of the features
        they are large, and heads weighted by them would take steps that many times larger
        (features mode is not in the authors' code; conf/balancer/nashmtl.yaml: plain).
    transform: "none", "log" or "learned_scale": what the strategy differentiates (module docstring).
    gramian: `mode: features` only: "per_sample" (the Gramian of the feature Jacobian, every
        sample's entries apart) or "batch_sum" (of the feature gradients summed over the batch, as
        LibMTL forms it from representation gradients); the weights always act on the per-sample rows.
    """

    needs_task_gradients: ClassVar[bool] = True

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        aggregator: Aggregator | Callable[..., Aggregator],
        mode: str = "params",
        shared: Sequence[str] = ("backbone",),
        seed: int = 0,
        heads: str = "plain",
        features_heads: str | None = None,
        transform: str = "none",
        gramian: str = "per_sample",
    ) -> None:
        super().__init__(tasks=tasks)
        if gramian not in GRAMIANS:
            raise ValueError(f"balancer.gramian must be one of {list(GRAMIANS)}, got {gramian!r}")
        if gramian == "batch_sum" and mode != "features":
            raise ValueError(
                "balancer.gramian=batch_sum sums the feature gradients over the batch, so it needs balancer.mode=features "
                f"(got {mode!r}; in params mode the parameters' gradients are batch sums already)"
            )
        self.gramian = gramian
        if transform not in TRANSFORMS:
            raise ValueError(f"balancer.transform must be one of {list(TRANSFORMS)}, got {transform!r}")
        self.transform = transform
        if transform == "learned_scale":  # IMTL-L's s_t, trained with the model's optimiser
            self.loss_scale = nn.Parameter(torch.zeros(len(self.tasks)))
        if mode not in MODES:
            raise ValueError(f"balancer.mode must be one of {list(MODES)}, got {mode!r}")
        for key, value in (("heads", heads), ("features_heads", features_heads)):
            if value not in HEADS and not (key == "features_heads" and value is None):
                raise ValueError(f"balancer.{key} must be one of {list(HEADS)}, got {value!r}")
        self.heads = features_heads if mode == "features" and features_heads is not None else heads
        if isinstance(shared, str):
            shared = [shared]
        self.shared = [str(s).strip(".") for s in shared]
        if not self.shared:
            raise ValueError("balancer.shared is empty: name at least one module prefix, e.g. [backbone]")
        if mode == "features" and self.shared != ["backbone"]:
            raise ValueError(
                f"balancer.mode=features takes the backbone output as the shared representation, so "
                f"balancer.shared must be [backbone], got {self.shared}; use mode=params for other sets"
            )
        if not isinstance(aggregator, Aggregator):
            kwargs = {"n_tasks": len(self.tasks)} if _takes(aggregator, "n_tasks") else {}
            aggregator = aggregator(**kwargs)
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"balancer.aggregator must build a torchjd Aggregator, got {type(aggregator).__name__}")
        modes = supported_modes(aggregator)
        if mode not in modes:
            raise ValueError(
                f"balancer.mode={mode!r}: {type(aggregator).__name__} keeps state per shared parameter and runs in "
                f"mode {' or '.join(modes)} only (as its authors' code); use balancer.mode={modes[0]}"
            )
        self.aggregator = aggregator
        self.mode = mode
        if gramian == "batch_sum" and not self.gramian_based:
            raise ValueError(
                f"balancer.gramian=batch_sum changes the Gramian a weighting reads; {type(aggregator).__name__} acts on the "
                "Jacobian's entries themselves, so it has no batch-summed variant: use balancer.gramian=per_sample"
            )
        self.seed = int(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last_stats: dict[str, float] = {}

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this strategy runs in (see `supported_modes`)."""
        return supported_modes(self.aggregator)

    # -- weighting interface: the value of the loss, for logging -----------------------------------
    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        """The latest aggregation weights (1 before the first step); the total they give is only
        reported, the update itself comes from the aggregated gradient."""
        return {t: self.last_weights.get(t, 1.0) for t in self.tasks}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        weights = self.task_weights(losses)
        return sum(torch.as_tensor(weights[t]).to(losses[t]) * losses[t].detach() for t in self.tasks)

    # -- the shared set ---------------------------------------------------------------------------
    def is_shared(self, name: str) -> bool:
        """Whether a parameter name of the model lies under one of the shared prefixes."""
        return any(name == p or name.startswith(f"{p}.") for p in self.shared)

    def bind_columns(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        """Called by the task-gradient step (params mode) once it has chosen the aggregated
        parameters: the Jacobian's columns are theirs, in this order. Aggregators that treat
        groups of columns apart (GradVac's layers or matrices) declare `bind_columns` and get them."""
        bind = getattr(self.aggregator, "bind_columns", None)
        if bind is not None:
            bind(list(names), [int(s) for s in sizes])

    def bind(self, model: nn.Module) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        found = {p: any(n == p or n.startswith(f"{p}.") for n in names) for p in self.shared}
        missing = [p for p, ok in found.items() if not ok]
        if missing:
            tops = sorted({n.split(".", 1)[0] for n in names})
            raise ValueError(
                f"balancer.shared names {missing}, which hold no trainable parameter of the model; "
                f"top-level modules with trainable parameters: {tops}"
            )
        if self.mode == "features" and getattr(getattr(model, "backbone", None), "task_conditioned", False):
            raise ValueError(
                "balancer.mode=features needs one representation shared by all tasks, but this backbone "
                "computes its features once per task (task-conditioned MoE or MTLoRA layers); use balancer.mode=params"
            )

    # -- aggregation ------------------------------------------------------------------------------
    @property
    def gramian_based(self) -> bool:
        """Whether the weights follow from the Gramian J J^T alone, so that features mode can sum
        per-process Gramians instead of gathering the Jacobian. torchjd's Gramian weightings are;
        torchjd's Nash-MTL weighting reads the matrix only through J J^T and |w^T J|, so a square
        root of the Gramian gives it the same weights. Other matrix weightings (torchjd's
        ExcessMTL: element-wise squares) see the Jacobian itself."""
        return isinstance(self.aggregator, (GramianWeightedAggregator, TorchJDNashMTL))

    @property
    def needs_losses(self) -> bool:
        """Whether the aggregation reads the step's losses (MGDA's loss normalisations, a loss
        transform, a Jacobian aggregation that declares it)."""
        weighting = getattr(self.aggregator, "gramian_weighting", None)
        return (
            getattr(weighting, "normalization", "none") in ("loss", "loss+")
            or self.transform != "none"
            or getattr(self.aggregator, "needs_losses", False)
        )

    @property
    def weighs_heads(self) -> bool:
        """Whether the heads' gradients are combined with per-task weights (`heads: weighted`, or
        a loss transform, whose factors scale each task's head gradient) rather than summed."""
        return self.heads == "weighted" or self.transform != "none"

    def transform_factors(self, losses: Tensor | None) -> Tensor | None:
        """(T,) float32 factors d with (gradient of the transformed loss) = d_t g_t, None without a
        transform; `losses` are the step's (global) task losses."""
        if self.transform == "none":
            return None
        if self.transform == "learned_scale":
            return self.loss_scale.detach().float().exp()
        if losses is None:
            raise ValueError("balancer.transform=log needs the step's task losses")
        return 1.0 / (losses.detach().float() + LOG_EPS)

    def transformed_losses(self, losses: Tensor) -> Tensor:
        """(T,) the values the strategy differentiates (detached)."""
        losses = losses.detach().float()
        if self.transform == "log":
            return torch.log(losses + LOG_EPS)
        if self.transform == "learned_scale":
            s = self.loss_scale.detach().float()
            return s.exp() * losses - s
        return losses

    def own_gradients(self, losses: Tensor | None) -> list[tuple[nn.Parameter, Tensor]]:
        """Gradients of the balancer's own parameters from the step's (global) losses: IMTL-L's
        d/ds_t (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1; empty when it has none."""
        if self.transform != "learned_scale" or losses is None:
            return []
        s = self.loss_scale.detach().float()
        return [(self.loss_scale, (s.exp() * losses.detach().float().to(s) - 1.0).to(self.loss_scale))]

    def weigh(
        self, gramian: Tensor, losses: Tensor | None = None, jacobian: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(T, T) Gramian of the (global) Jacobian, optional (T,) global losses and (params mode)
        the Jacobian itself -> (aggregation weights (T,), head weights (T,) or None for plain
        heads), float32."""
        agg = self.aggregator
        heads = None
        with seeded_rng(self.seed, int(self.steps)):
            rows = None
            if isinstance(agg, ReferenceAggregator) and jacobian is not None:
                rows = agg.gramian_weighting.weigh_rows(jacobian, losses)
            if rows is not None:
                weights, heads = rows
            elif isinstance(agg, ReferenceAggregator):  # float32 or float64 inside, as its authors
                weights, heads = agg.weigh(gramian.double(), losses)
            elif isinstance(agg, GramianWeightedAggregator):
                weights = agg.gramian_weighting(gramian.double())
            else:
                weights = agg.weighting(psd_root(gramian.double()))
        weights = weights.detach().float()
        if self.heads == "plain":
            return weights, None
        return weights, weights if heads is None else heads.detach().float()

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """Aggregation weights (T,) from the Gramian of the (global) Jacobian."""
        return self.weigh(gramian, losses)[0]

    def aggregate(self, jacobian: Tensor, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(T, n) Jacobian (identical on every process) -> (aggregated (n,), weights (T,)).

        Aggregators without weights (GradDrop) report, as each task's weight, the share of its
        gradient's entries that passed."""
        vector, weights, _ = self.aggregate_with_heads(jacobian, gramian, losses)
        return vector, weights

    def aggregate_with_heads(
        self, jacobian: Tensor, gramian: Tensor, losses: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """As `aggregate`, plus the head weights (T,) (None when the heads take the plain sum).
        Runs in float32 outside autocast whatever the surrounding precision. With a loss transform
        the aggregation sees the rows d_t g_t; the weights returned are those of the rows g_t."""
        with torch.autocast(jacobian.device.type, enabled=False):
            jacobian = jacobian.float()
            factors = self.transform_factors(losses)
            if factors is not None:
                factors = factors.to(jacobian.device)
                jacobian = factors.view(-1, 1) * jacobian
                gramian = gramian * (factors.view(-1, 1) * factors.view(1, -1)).to(gramian)
                losses = self.transformed_losses(losses) if losses is not None else None
            vector, weights, heads = self._aggregate_rows(jacobian, gramian, losses)
            if factors is None:
                return vector, weights, heads
            heads = factors if heads is None else heads.to(factors) * factors
            return vector, weights.to(factors) * factors, heads

    def _aggregate_rows(
        self, jacobian: Tensor, gramian: Tensor, losses: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(self.aggregator, JacobianAggregator):
            with seeded_rng(self.seed, int(self.steps), jacobian.device):
                vector, weights, heads = self.aggregator.combine(jacobian, losses)
            return vector, weights.float(), (None if heads is None or self.heads == "plain" else heads.float())
        if self.gramian_based:
            weights, heads = self.weigh(gramian, losses, jacobian if self.mode == "params" else None)
            return weights.to(jacobian) @ jacobian, weights, heads
        if isinstance(self.aggregator, WeightedAggregator):  # a matrix weighting: the rows themselves
            with seeded_rng(self.seed, int(self.steps), jacobian.device):
                weights = self.aggregator.weighting(jacobian).detach().float()
            return weights @ jacobian, weights, (weights if self.heads == "weighted" else None)
        with seeded_rng(self.seed, int(self.steps), jacobian.device):
            vector = self.aggregator(jacobian)
        nonzero = jacobian != 0
        kept = (nonzero & ((vector.unsqueeze(0) * jacobian) > 0)).sum(1).float()
        weights = kept / nonzero.sum(1).clamp(min=1).float()
        return vector, weights, (weights if self.heads == "weighted" else None)

    def record(self, weights: Tensor, gramian: Tensor) -> None:
        self.last_weights = {t: weights[i].detach().float().cpu() for i, t in enumerate(self.tasks)}
        self.last_stats = gramian_stats(gramian.detach().double().cpu(), self.tasks)

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        self.steps += 1

    def on_train_epoch_end(self) -> None:
        """Passed on to an aggregator that counts epochs (MoCo's rate decays and epoch-0 restarts)."""
        hook = getattr(self.aggregator, "on_train_epoch_end", None)
        if hook is not None:
            hook()

    def checkpoint_state(self) -> bytes | None:
        # torchjd's stateful aggregators (Nash-MTL: warm start, step counter, cached weights) keep
        # their state in plain attributes and cvxpy problems, so the aggregator goes in whole
        return pickle.dumps(self.aggregator) if isinstance(self.aggregator, Stateful) else None

    def load_checkpoint_state(self, state: bytes) -> None:
        aggregator = pickle.loads(state)  # the run's own checkpoint, loaded to resume it
        if type(aggregator) is not type(self.aggregator):
            raise ValueError(
                f"the checkpoint's balancer state is a {type(aggregator).__name__}, "
                f"but this run's aggregator is a {type(self.aggregator).__name__}"
            )
        self.aggregator = aggregator


def supported_modes(aggregator: Aggregator) -> tuple[str, ...]:
    """The modes an aggregator runs in: a `JacobianAggregator` declares its own (params only, its
    state is per shared parameter), as does a stateful matrix weighting of torchjd (ExcessMTL:
    squares per parameter); the others run in both."""
    declared = getattr(aggregator, "modes", None)
    if declared is not None:
        return tuple(declared)
    matrix_weighting = isinstance(aggregator, WeightedAggregator) and not isinstance(
        aggregator, (GramianWeightedAggregator, TorchJDNashMTL)
    )
    return ("params",) if matrix_weighting and isinstance(aggregator, Stateful) else MODES


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
