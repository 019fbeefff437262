"""Loss-weight schemes for anytime networks: the total loss is ``sum_i weights[i] * loss_i``.

A scheme holds the K per-head weights and may adapt them from the losses it sees. The trainer calls
``update`` once per *optimizer step* (not per gradient-accumulation micro-step) with the K detached
per-head losses of that step, reads ``weights`` for the next step, calls ``set_progress`` at the start
of each epoch, and checkpoints ``state_dict()``.

A scheme lives where the losses are: the trainer moves it to the training device (``to``), and its
updates are tensor operations there, so a step never waits for the device to copy a value to the
host (no ``.item()``, ``.cpu()`` or ``bool(tensor)`` per step). ``state_dict`` holds CPU copies.

Under ``torch.distributed`` the adaptive schemes all-reduce (mean) the per-head values before their
EMA update, so every rank holds identical weights and optimizes the same function: one collective of
K float32 values per step. The EMA is linear, so this equals averaging the per-rank EMAs.

Schemes live in a small registry filled by ``@register(name)``; ``get(name, num_heads, **hparams)``
builds one. References: Hu et al., "Learning Anytime Predictions in Neural Networks via Adaptive
Loss Balancing", AAAI 2019 (AdaLoss, Eq. 7); Kaya et al., "Shallow-Deep Networks", ICML 2019 (SDN).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from annify.errors import SpecError, UnknownNameError

__all__ = [
    "HeadLocal",
    "WeightScheme",
    "available",
    "distill_losses",
    "get",
    "objectives",
    "per_head_grad_norms",
    "register",
    "scale_grad",
]

_REGISTRY: dict[str, type[WeightScheme]] = {}

# EMA values are clamped into [_EPS, _BIG] before taking ratios, so a head whose loss reaches 0 gets
# weight 1 instead of 0/0, and an (impossible in practice) overflowing EMA gets weight gamma.
_EPS = 1e-12
_BIG = torch.finfo(torch.float32).max


def register(name: str) -> Callable[[type[WeightScheme]], type[WeightScheme]]:
    """Class decorator that adds a weight scheme to the registry under ``name``."""

    def deco(cls: type[WeightScheme]) -> type[WeightScheme]:
        if name in _REGISTRY:
            raise ValueError(f"weight scheme {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of the registered weight schemes, sorted."""
    return sorted(_REGISTRY)


def get(name: str, num_heads: int, **hparams: float | int) -> WeightScheme:
    """Build the scheme ``name`` for ``num_heads`` outputs; ``hparams`` go to its constructor."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown weight scheme {name!r}; available: {', '.join(available())}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "num_heads")]
    params = inspect.signature(cls.__init__).parameters
    for key, value in hparams.items():
        if key not in accepted:
            raise SpecError(
                f"weight scheme {name!r} has no hyperparameter {key!r}; accepted: {', '.join(accepted) or 'none'}"
            )
        default = params[key].default
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not numeric:
            raise SpecError(f"hyperparameter {key} of {name} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and numeric and value != int(value):
            raise SpecError(f"hyperparameter {key} of {name} must be an integer, got {value!r}")
    return cls(num_heads, **hparams)


def _mean_across_ranks(values: Tensor) -> Tensor:
    """All-reduce (mean) a small float vector over the default process group; identity when not distributed.

    The result stays on the device of ``values`` (nccl reduces it there, without a host copy).
    """
    values = values.detach().to(torch.float32)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = values.to(device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)  # gloo has no AVG; divide ourselves
    return (buf / dist.get_world_size()).to(values.device)


def per_head_grad_norms(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """L2 norm of each head's loss gradient over ``params``: ``||d loss_i / d params||_2`` for each i.

    Costs one extra backward pass per head (graphs are retained so the trainer can still backward the
    weighted sum). Pass the shared trainable parameters (e.g. the backbone's). Parameters a head does
    not reach contribute 0. Returns a detached 1-D float32 tensor on the parameters' device.
    """
    norms = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(sq).sum().sqrt() if sq else loss.new_zeros((), dtype=torch.float32))
    return torch.stack(norms).detach().to(torch.float32)


class WeightScheme:
    """Base of all schemes: fixed weights, no state beyond them, ``update`` only checks its input.

    Subclasses set ``self._weights`` in ``__init__`` and override what they need.
    """

    name: str = ""
    needs_grad_norms: bool = False

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self.device = torch.device("cpu")
        self._weights = torch.ones(num_heads, dtype=torch.float32)

    @property
    def weights(self) -> Tensor:
        """Current weights: 1-D float32 tensor of K entries (a copy), on the scheme's device."""
        return self._weights.clone()

    def to(self, device: torch.device | str) -> WeightScheme:
        """Keep the weights and every other tensor of the scheme's state on ``device``; returns self.

        A scheme's state is its tensor attributes, so a registered scheme of one's own moves too.
        """
        self.device = torch.device(device)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, key, value.to(self.device))
        return self

    def _check(self, values: Tensor, what: str = "losses") -> Tensor:
        if values.dim() != 1 or values.numel() != self.num_heads:
            raise ValueError(
                f"{what} must be a 1-D tensor of {self.num_heads} values, got shape {tuple(values.shape)}"
            )
        return values.detach()

    def update(self, losses: Tensor) -> None:
        """Observe the detached per-head losses of one optimizer step (fixed schemes ignore them)."""
        self._check(losses)

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Tell the scheme which epoch starts (0-based) out of ``epochs``; most schemes ignore it."""

    def state_dict(self) -> dict:
        return {"num_heads": self.num_heads, "weights": self._weights.to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_heads"] != self.num_heads:
            raise ValueError(f"state is for {state['num_heads']} heads, this scheme has {self.num_heads}")
        self._weights = _on(state["weights"], self.device)


@register("const")
class Const(WeightScheme):
    """CONST: every output weighs 1, the usual choice in anytime/early-exit training (paper, Sec. 5)."""


@register("linear")
class Linear(WeightScheme):
    """LINEAR: weights rise linearly from 0.25 at the first output to 1 at the last (paper, Sec. 5)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads)
        if num_heads > 1:
            self._weights = torch.linspace(0.25, 1.0, num_heads, dtype=torch.float32)


@register("half_end")
class HalfEnd(WeightScheme):
    """Half the total weight on the final output, the other half spread evenly over the earlier ones.

    Normalized so the weights sum to K, like CONST, keeping the loss scale (and thus the learning rate)
    comparable: last = K/2, every other = (K/2)/(K-1). With K = 1 the single weight is 1.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads)
        if num_heads > 1:
            self._weights.fill_(num_heads / 2 / (num_heads - 1))
            self._weights[-1] = num_heads / 2


@register("opt")
class Opt(WeightScheme):
    """OPT: all weight on one output (``head``, 0-based, negative counts from the end).

    Trains the paper's per-output reference network, against which anytime errors are reported.
    """

    def __init__(self, num_heads: int, head: int = -1) -> None:
        super().__init__(num_heads)
        if not isinstance(head, int) or not -num_heads <= head < num_heads:
            raise SpecError(f"opt head {head} out of range for {num_heads} heads")
        self.head = head
        self._weights.zero_()
        self._weights[head] = 1.0


@register("adaloss")
class AdaLoss(WeightScheme):
    """AdaLoss (Hu et al. 2019, Eq. 7): weights inversely proportional to each head's expected loss.

    Each optimizer step the EMA ``l_hat_i <- m * l_hat_i + (1 - m) * l_i`` is updated (started from
    the first losses seen). Every ``period`` steps (after steps period, 2*period, ...) the weights
    become ``B_i = (1 - gamma) * min_j l_hat_j / l_hat_i + gamma``: the gradient of
    ``sum_i alpha (1 - gamma) ln l_i + gamma l_i`` with ``alpha = min_j l_hat_j``, so the largest
    weight is exactly 1 and none falls below gamma. Weights are all ones before the first refresh.

    The EMA is kept in float32 (it is in the state dict). Non-finite inputs (e.g. an AMP overflow
    step) leave that head's EMA unchanged; for the ratio the EMA is clamped to [1e-12, float32 max]
    so a zero loss gives weight 1 rather than 0/0. Under ``torch.distributed`` the inputs are averaged
    over ranks first, so every rank holds the same weights.

    Args:
        num_heads: number of outputs K.
        gamma: mixture weight of the uniform weights (paper: 0.05; 0 is pure AdaLoss, 1 is CONST).
        momentum: EMA momentum m (paper: 0.9).
        period: optimizer steps between weight refreshes, ``e`` in the paper (paper: 1).
        final_extra: added to the last output's ratio ``min_j l_hat_j / l_hat_K`` before the weights are
            divided by their largest and mixed with gamma, as the authors' code does
            (``AdaptiveLossWeight``, default 0.5 there); 0 (annify's default) is the paper's Eq. 7.
    """

    def __init__(
        self,
        num_heads: int,
        gamma: float = 0.05,
        momentum: float = 0.9,
        period: int = 1,
        final_extra: float = 0.0,
    ) -> None:
        super().__init__(num_heads)
        if not 0.0 <= gamma <= 1.0:
            raise SpecError(f"gamma must be in [0, 1], got {gamma}")
        if not 0.0 <= momentum < 1.0:
            raise SpecError(f"momentum must be in [0, 1), got {momentum}")
        if not isinstance(period, int) or period < 1:
            raise SpecError(f"period must be a positive int, got {period!r}")
        if not (isinstance(final_extra, (int, float)) and final_extra >= 0.0):
            raise SpecError(f"final_extra must be a non-negative number, got {final_extra!r}")
        self.gamma, self.momentum, self.period = gamma, momentum, period
        self.final_extra = float(final_extra)
        self.ema: Tensor | None = None  # float32, K entries; None until the first update
        self.step = 0

    def update(self, losses: Tensor) -> None:
        self._observe(_mean_across_ranks(self._check(losses)))

    def _observe(self, values: Tensor) -> None:
        finite = torch.isfinite(values)
        if self.ema is None:
            self.ema = values.clone()
        else:
            moved = self.momentum * self.ema + (1.0 - self.momentum) * values
            self.ema = torch.where(
                finite & torch.isfinite(self.ema), moved, torch.where(finite, values, self.ema)
            )
        self.step += 1
        if self.step % self.period == 0:
            safe = torch.nan_to_num(self.ema, nan=_BIG, posinf=_BIG, neginf=_EPS).clamp(_EPS, _BIG).double()
            ratio = safe.min() / safe  # exactly 1 at the smallest expected loss
            if self.final_extra:
                ratio = torch.cat([ratio[:-1], ratio[-1:] + self.final_extra])
                ratio = ratio / ratio.max()
            weights = torch.where(ratio == 1.0, 1.0, (1.0 - self.gamma) * ratio + self.gamma)
            self._weights = weights.to(torch.float32)

    def state_dict(self) -> dict:
        ema = None if self.ema is None else self.ema.to("cpu", copy=True)
        return {**super().state_dict(), "ema": ema, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema = None if state["ema"] is None else _on(state["ema"], self.device)
        self.step = int(state["step"])


@register("adaloss_grad")
class AdaLossGrad(AdaLoss):
    """First-order AdaLoss: the AdaLoss rule fed each head's gradient norm instead of its loss.

    The paper (Sec. 6) names this "first-order" variant as future work: normalizing by gradient
    magnitude also cancels unknown loss offsets, not just scales. The authors' TF code
    (``--adaloss_order 1``) feeds half the mean squared gradient; here it is the L2 norm, so that with
    gamma = 0 each weighted head gradient has the same norm.

    The trainer must pass ``grad_norms`` on every ``update`` call, e.g. from
    :func:`per_head_grad_norms` over the shared trainable parameters: one extra backward per head
    per optimizer step (``period`` only delays the weight refresh). Per-rank norms are averaged.
    """

    needs_grad_norms = True

    def update(self, losses: Tensor, grad_norms: Tensor | None = None) -> None:
        self._check(losses)
        if grad_norms is None:
            raise ValueError(
                "adaloss_grad needs grad_norms (one per head); compute them with per_head_grad_norms"
            )
        self._observe(_mean_across_ranks(self._check(grad_norms, "grad_norms")))


@register("sdn")
class SDN(WeightScheme):
    """SDN's linear ramp (Kaya et al. 2019): internal output i weighs ``min(C_i, 0.01 + epoch * C_i / epochs)``.

    ``C_i = 0.9 * i / (K - 1)`` for the K - 1 internal outputs, which is SDN's
    [0.15, 0.3, 0.45, 0.6, 0.75, 0.9] for K - 1 = 6; the final output always weighs 1. SDN counts
    epochs from 1, so with ``set_progress(epoch, epochs)`` taking the 0-based epoch about to start,
    the ramp uses ``epoch + 1``: the last epoch reaches ``C_i`` exactly, as in SDN. Before the first
    ``set_progress`` the internal weights are ``min(C_i, 0.01)``.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads)
        k = num_heads - 1
        self.max_coeffs = torch.arange(1, k + 1, dtype=torch.float64) * 0.9 / max(k, 1)
        self.epoch, self.epochs = -1, 1
        self._refresh()

    def _refresh(self) -> None:
        tau = torch.clamp(0.01 + (self.epoch + 1) * self.max_coeffs / self.epochs, max=self.max_coeffs)
        self._weights = torch.cat([tau, tau.new_ones(1)]).to(self.device, torch.float32)

    def set_progress(self, epoch: int, epochs: int) -> None:
        if epochs < 1 or not 0 <= epoch < epochs:
            raise ValueError(f"need 0 <= epoch < epochs, got epoch={epoch}, epochs={epochs}")
        self.epoch, self.epochs = epoch, epochs
        self._refresh()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.epoch, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch, self.epochs = int(state["epoch"]), int(state["epochs"])
        self._refresh()


def _on(value: Tensor, device: torch.device) -> Tensor:
    """A float32 copy of a checkpointed tensor on ``device``."""
    return value.detach().to(device, torch.float32, copy=True)


# -------------------------------------------------------------------- head-local weighting


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale`` (a 0-d tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_grad(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` unchanged, but the gradient that flows back through it is multiplied by ``scale``."""
    return _ScaleGrad.apply(x, scale)


class HeadLocal:
    """Head-local weighting: output i's weight scales only the gradient its head sends into the trunk.

    With the scheme's weights ``w``, the trainer minimizes ``sum_{i<K} CE_i + w_K * CE_K`` while a
    gradient-scaling op at each tap (identity forward, ``* w_i`` backward) sits between the trunk and
    head i. So head i's own parameters learn from ``dCE_i/dtheta_i`` at full weight, and the trunk
    receives ``sum_i w_i * dCE_i/dtrunk``, exactly what the plain weighted sum gives it. The model's
    own classifier is part of the trunk and keeps its scheme weight. Plain AdaLoss (paper Eq. 7) puts
    weights near gamma on early outputs, which also shrinks their heads' effective learning rate;
    head-local weighting keeps the trunk's balance and lets every head fit its features.

    The scales live in one tensor on the network's device, updated in place before each step, so
    DDP, ``torch.compile`` and resumed runs see one graph. Attach with ``HeadLocal(net)``; it
    registers a forward pre-hook on each head of ``net.exits``; ``remove()`` takes them off. Per
    step: ``set(weights)`` before the forward (the backward reads the scales the forward saved),
    then ``objective(losses, weights).backward()``.
    """

    def __init__(self, net) -> None:
        heads = list(net.exits)
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self.scales = torch.ones(len(heads), dtype=torch.float32, device=device)  # (K-1,)
        self._hooks = [
            head.register_forward_pre_hook(functools.partial(self._hook, j)) for j, head in enumerate(heads)
        ]

    def _hook(self, j: int, module, args: tuple) -> tuple:
        return (scale_grad(args[0], self.scales[j]), *args[1:])

    def set(self, weights: Tensor) -> None:
        """Scale the taps' backward by ``weights[:-1]``; call before the forward of the step they weigh."""
        with torch.no_grad():
            self.scales.copy_(weights[:-1].to(self.scales.device, torch.float32))

    @staticmethod
    def objective(losses: Tensor, weights: Tensor) -> Tensor:
        """``sum_{i<K} CE_i + w_K * CE_K``: each head at full weight, the model's classifier at its own."""
        return losses[:-1].sum() + weights[-1].to(losses.device) * losses[-1]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# -------------------------------------------------------------------- distillation


def distill_losses(outs: Sequence[Tensor], y: Tensor, gamma: float, temperature: float = 1.0) -> Tensor:
    """Per-output objective with distillation from the last output (IMTA's second stage), a (K,) tensor.

    Output i < K: ``(1 - gamma) * CE_i + gamma * T^2 * KL(p_K,T || p_i,T)``, with ``p_K`` the last
    output's softmax at temperature T, detached (a teacher, never pulled towards the students).
    The last output keeps its plain cross-entropy. ``gamma = 0`` is plain cross-entropy everywhere.
    """
    return objectives(outs, y, gamma, temperature)[0]


def objectives(
    outs: Sequence[Tensor],
    y: Tensor,
    gamma: float = 0.0,
    temperature: float = 1.0,
    teacher: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(each output's objective, each output's cross-entropy), two (K,) tensors.

    Without ``teacher``: ``distill_losses``. With ``teacher`` (a frozen network's logits, e.g. the
    original network a run started from): every output, the last included, learns
    ``(1 - gamma) * CE_i + gamma * T^2 * KL(p_teacher,T || p_i,T)``. A weight scheme observes the
    cross-entropies (what it balances), and its weights multiply the objectives.
    """
    import torch.nn.functional as F

    ce = torch.stack([F.cross_entropy(o.float(), y) for o in outs])
    if gamma == 0.0 or (len(outs) == 1 and teacher is None):
        return ce, ce
    t = float(temperature)
    students = outs if teacher is not None else outs[:-1]
    target = (outs[-1] if teacher is None else teacher).detach().float()
    target = F.log_softmax(target / t, dim=1)
    kl = torch.stack(
        [
            F.kl_div(F.log_softmax(o.float() / t, dim=1), target, reduction="batchmean", log_target=True)
            for o in students
        ]
    )
    mixed = (1.0 - gamma) * ce[: len(students)] + gamma * t * t * kl
    return (mixed if teacher is not None else torch.cat([mixed, ce[-1:]])), ce
