"""The autoencoder's optimiser: Adam, with lazy per-category updates for the context maps.

With one ``nn.Linear`` per category and one Adam over all of them (the seed's design), a category
absent from a batch has no gradient, so Adam skips it, and each category counts its own steps. A
stacked (K, L, L) parameter under plain Adam would instead move every category every step
(momentum) and pay a dense K x L x L update. :class:`ContextAdam` keeps the per-module semantics on
the stacked parameter: its rows are categories, and only the rows a step's gradient touches move,
each with its own step count (so its bias correction is a separate module's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.adam import adam

from cae.model.cae import CAE
from cae.train.torch_internals import sparse_rows
from cae.types import LRSchedule


def build_optimizers(
    model: CAE, classifier: nn.Module, lr: float, classifier_lr: float, internals: bool = False
) -> tuple[ContextAdam, torch.optim.Adam]:
    """The trainer's optimisers: :class:`ContextAdam` for the autoencoder and Adam for the
    classifier, both on torch's fused kernel where the parameters' device has one (the CPU and
    CUDA; several times faster than the default per-tensor loop for a Census-like model's dense
    parameters on the CPU: ``docs/decisions.md``).

    Args:
        model: the autoencoder (its context maps are the row parameters).
        classifier: the context classifier.
        lr, classifier_lr: their learning rates.
        internals: let :class:`ContextAdam` read sparse gradients through torch internals
            (``train.torch_internals``, :mod:`cae.train.torch_internals`).

    Returns:
        ``(optimizer, classifier_optimizer)``.
    """
    device = next(model.parameters()).device
    fused = True if device.type in ("cpu", "cuda") else None
    rows = model.row_parameters()
    optimizer = ContextAdam(model.parameters(), rows, lr=lr, fused=fused, internals=internals)
    classifier_optimizer = torch.optim.Adam(classifier.parameters(), lr=classifier_lr, fused=fused)
    return optimizer, classifier_optimizer


def scheduled_lr(lr: float, schedule: LRSchedule, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (1-based) of ``epochs`` under ``train.lr_schedule``:
    ``lr`` when constant; with cosine ``lr (1 + cos(pi (epoch - 1) / epochs)) / 2``, ``lr`` in the
    first epoch and ``lr (1 - cos(pi / epochs)) / 2`` in the last. Per epoch, so that a resumed
    training takes the rate its epoch had (a resume to more epochs stretches the curve)."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


class ContextAdam(torch.optim.Adam):
    """Adam for every parameter; per-category ("row") parameters are updated lazily, per row.

    A row parameter's gradient may be sparse COO in its first dimension (what
    ``cae.model.context_maps`` gives with ``sparse_grad=True``): then only those rows are read and
    written. A dense gradient (the ``gather`` method, distributed training) is masked instead:
    rows whose gradient is exactly zero count as absent, with the same arithmetic, and no host
    sync on an accelerator.

    Args:
        params: every parameter of the model (the row parameters among them).
        row_parameters: the per-category parameters, a subset of ``params``.
        lr, betas, eps: as :class:`torch.optim.Adam`.
        fused: Adam's fused implementation for the dense parameters (None: torch's default);
            the row parameters take the fused kernel on the CPU and CUDA unless this is False.
        internals: read a sparse gradient's rows without coalescing it
            (:func:`cae.train.torch_internals.sparse_rows`: a private torch API, opt-in).

    After :meth:`step`, :attr:`updated_rows` maps each row parameter updated from a sparse
    gradient to the (sorted) rows it changed, for ``CAE.project_nonnegative(rows)``.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        row_parameters: Sequence[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        internals: bool = False,
    ) -> None:
        row_ids = {id(p) for p in row_parameters}
        groups: list[dict] = [{"params": [p for p in params if id(p) not in row_ids]}]
        if row_parameters:
            groups.append({"params": list(row_parameters), "rows": True})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=fused)
        self.internals = internals
        self.updated_rows: dict[torch.Tensor, torch.Tensor] = {}
        # Per row parameter, the row views of it and of its state that the fused kernel takes,
        # made once (unbinding K rows of four tensors every step costs more than the update of
        # a few); remade when any of those tensors is replaced (load_state_dict, param.data = ...).
        self._row_views: dict[int, tuple[tuple[int, ...], tuple[tuple[torch.Tensor, ...], ...]]]
        self._row_views = {}

    @torch.no_grad()
    # (override: unlike Optimizer.step it takes no closure, so it returns no loss)
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """One Adam step: the dense parameters by :class:`torch.optim.Adam`, the row parameters
        lazily (only touched rows move)."""
        if closure is not None:
            raise ValueError("ContextAdam does not take a closure")
        pending = []
        for group in self.param_groups:
            if group.get("rows"):
                for param in group["params"]:
                    if param.grad is not None:
                        pending.append((param, param.grad, group))
                        param.grad = None  # hidden from Adam's own step
        try:
            super().step()
        finally:
            for param, grad, _ in pending:
                param.grad = grad
        self.updated_rows = {}
        for param, grad, group in pending:
            rows = self._row_step(param, grad, group)
            if rows is not None:
                self.updated_rows[param] = rows

    def _row_step(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict
    ) -> torch.Tensor | None:
        state = self.state[param]
        if not state:
            # One step count per row (category), as if every category were its own parameter.
            state["step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        if grad.is_sparse:
            rows, values = _summed_rows(grad, self.internals)
        elif param.device.type == "cpu":  # the rows reached: a host sync costs nothing here
            rows = grad.flatten(1).ne(0).any(dim=1).nonzero().squeeze(1)
            values = grad[rows]
        else:
            self._masked_step(param, grad, state, group)
            return None
        _adam_on_rows(param, rows, values, state, group, self._views(param, state))
        return rows

    def _views(self, param: torch.Tensor, state: dict) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The row views of ``param`` and of its ``exp_avg``, ``exp_avg_sq`` and ``step``."""
        tensors = (param, state["exp_avg"], state["exp_avg_sq"], state["step"])
        key = tuple(t.data_ptr() for t in tensors)
        cached = self._row_views.get(id(param))
        if cached is None or cached[0] != key:
            cached = (key, tuple(t.unbind(0) for t in tensors))
            self._row_views[id(param)] = cached
        return cached[1]

    @staticmethod
    def _masked_step(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """The row update from a dense gradient on an accelerator, without a host sync: every
        row is computed and only the rows with a non-zero gradient are kept."""
        touched = grad.flatten(1).ne(0).any(dim=1)  # (K,) rows this step reached
        steps = state["step"] + touched
        new_param = param.clone()
        exp_avg, exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        _adam_math(new_param, grad, exp_avg, exp_avg_sq, steps.clamp_min(1), group)
        mask = touched.view(-1, *([1] * (param.dim() - 1)))
        param.copy_(torch.where(mask, new_param, param))
        state["exp_avg"].copy_(torch.where(mask, exp_avg, state["exp_avg"]))
        state["exp_avg_sq"].copy_(torch.where(mask, exp_avg_sq, state["exp_avg_sq"]))
        state["step"] = steps


def _adam_on_rows(
    param: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    state: dict,
    group: dict,
    views: tuple[tuple[torch.Tensor, ...], ...],
) -> None:
    """Adam on some rows of ``param`` in place, each row with its own step count.

    Unless the group's ``fused`` is False, on the CPU and CUDA every row is handed to torch's fused
    Adam (``torch.optim.adam.adam``,
    ``fused=True``) as a tensor of its own (a view, nothing is copied; ``views`` holds the row
    views of ``param``, ``exp_avg``, ``exp_avg_sq`` and ``step``), with its own step: one pass
    over the touched rows, the seed's per-module arithmetic. Otherwise the rows are gathered and
    updated by :func:`_adam_math`.
    """
    beta1, beta2 = group["betas"]
    if group["fused"] is not False and param.device.type in ("cpu", "cuda"):
        chosen = rows.tolist()
        params, exp_avgs, exp_avg_sqs, steps = ([t[i] for i in chosen] for t in views)
        adam(
            params,
            list(values.unbind(0)),
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=True,
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )  # fmt: skip  (adds 1 to every row's step through its view)
        return
    steps = state["step"][rows] + 1
    state["step"][rows] = steps
    exp_avg, exp_avg_sq = state["exp_avg"][rows], state["exp_avg_sq"][rows]
    values_now = param[rows]
    _adam_math(values_now, values, exp_avg, exp_avg_sq, steps, group)
    param.index_copy_(0, rows, values_now)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)


def _summed_rows(grad: torch.Tensor, internals: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct rows of a sparse COO gradient (K first) and their summed values.

    A training pass's gradient holds each touched row once (one sum over every application), but
    autograd marks it uncoalesced, so the public ``values()`` takes a ``coalesce()`` (a copy);
    with ``internals`` the rows are read in place when they are sorted and distinct.
    """
    if internals and not grad.is_coalesced() and (found := sparse_rows(grad)) is not None:
        return found
    grad = grad if grad.is_coalesced() else grad.coalesce()
    return grad.indices()[0], grad.values()


def _adam_math(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: torch.Tensor,
    group: dict,
) -> None:
    """Adam's update of rows in place (torch's formula), each row with its own step ``steps``."""
    beta1, beta2 = group["betas"]
    shape = (-1, *([1] * (param.dim() - 1)))
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** steps.double()
    bias_correction2_sqrt = (1 - beta2 ** steps.double()).sqrt()
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt.to(param.dtype).view(shape)
    denom.add_(group["eps"])
    step_size = (group["lr"] / bias_correction1).to(param.dtype).view(shape)
    param.addcdiv_(exp_avg * step_size, denom, value=-1.0)
