"""The passes of one cycle-training step: the model's math (:func:`reference_passes`) and the
same numbers computed fused (:class:`FusedPasses`, what training runs).

A step runs the model on a batch four ways (all sharing the loss terms of :mod:`cae.train.cycle`):

* cycle 1: ``(x, source -> target)``;
* the self pass: ``(x, source -> source)`` (self reconstruction, parsimony);
* cycle 2: ``(x_hat_1, target -> source)``, ``x_hat_1`` cycle 1's output;
* with the context-means term: ``(x, source -> moved)``, each cell moved in one field.

:func:`reference_passes` calls :meth:`cae.model.cae.CAE.forward` for each. :class:`FusedPasses`
computes the same outputs with fewer, larger operations: cycle 1, the self pass and the moved pass
share one encoding (every head's encoder in one matmul); each field's maps are applied once to
the latents of every pass decoded from it; the decoders read only the sum of the heads, one matmul
over every head's latent; the parsimony term comes from the latents (a Gram matrix), not from the
(B, G) terms; every host-side layout of the context maps is made before the first matmul; and all
applications of a field's maps in a step share one :class:`~cae.model.context_maps.MapsGradient`.
``tests/test_model.py`` holds the two equal, outputs and gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from cae.model.cae import CAE, CAEOutput, FieldHead
from cae.model.context_maps import MapsGradient, MapsPlan, resolve_method


class CyclePasses(NamedTuple):
    """The outputs of one step's passes that the loss terms read."""

    cycle1: torch.Tensor  # (B, G) (x, source -> target)
    own: torch.Tensor  # (B, G) (x, source -> source)
    cycle2: torch.Tensor  # (B, G) (cycle1, target -> source)
    moved: torch.Tensor | None  # (B, G) (x, source -> moved); None without the moved pass
    latents1: list[torch.Tensor]  # every head's (B, L) latent in cycle 1: base, then the fields
    latents2: list[torch.Tensor]  # the same in cycle 2
    # field -> the mean over cells and genes of its head's squared term in the self pass
    squares: dict[str, torch.Tensor]
    # with the count likelihood, the (B, G) log rates of the self pass and of cycle 2 (what the
    # negative binomial scores; the tensors above are then model-space means); None otherwise
    own_log_rate: torch.Tensor | None = None
    cycle2_log_rate: torch.Tensor | None = None
    log_theta: torch.Tensor | None = None  # (G,) the model's log inverse dispersion, with them


def _latents(out: CAEOutput) -> list[torch.Tensor]:
    return [out.base_hidden, *out.field_hidden.values()]


def reference_passes(
    model: CAE,
    x: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    moved: torch.Tensor | None = None,
) -> tuple[CyclePasses, CAEOutput]:
    """A step's passes as calls of the model (the design, and what evaluation runs).

    Args:
        model: the autoencoder.
        x: (B, G) model-space expression.
        source, target: (B, F) categories.
        moved: (B, F) targets of the moved pass, or None.

    Returns:
        ``(passes, own)``: the :class:`CyclePasses`, and the self pass with every head's term.
    """
    cycle1 = model(x, source, target)
    own = model(x, source)
    cycle2 = model(cycle1.output, target, source)
    moved_output = None if moved is None else model(x, source, moved).output
    squares = {field: term.square().mean() for field, term in own.fields.items()}
    passes = CyclePasses(
        cycle1.output, own.output, cycle2.output, moved_output, _latents(cycle1),
        _latents(cycle2), squares, own.log_rate, cycle2.log_rate, model.log_theta,
    )  # fmt: skip
    return passes, own


class FusedPasses(nn.Module):
    """:func:`reference_passes` fused (see the module docstring): the training step's forward.

    A module, so that DistributedDataParallel and ``torch.compile`` wrap it; its parameters are
    the model's.
    """

    def __init__(self, model: CAE) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        moved: torch.Tensor | None = None,
    ) -> CyclePasses:
        """The :class:`CyclePasses` of a batch (arguments as :func:`reference_passes`)."""
        heads = list(self.model.heads)
        columns = range(len(heads))
        # cycle 1, the self pass and the moved pass decode one encoding, in these contexts
        contexts = [target, source] if moved is None else [target, source, moved]
        # Every layout first, one after another: host work, faster with the host's caches warm
        # than each just before its matmul. Cycle 2 encodes in `target` and decodes in `source`.
        by_source = [head.plan(source[:, f]) for f, head in zip(columns, heads, strict=True)]
        by_target = [head.plan(target[:, f]) for f, head in zip(columns, heads, strict=True)]
        decode_index = [torch.cat([c[:, f] for c in contexts]) for f in columns]
        decode_plans = [head.plan(index) for head, index in zip(heads, decode_index, strict=True)]
        gradients = [_gradient(head, x.device) for head in heads]
        # cycle 1 (x, source -> target), the self pass and the moved pass: one encoding
        encode1 = list(zip(source.T, by_source, strict=True))
        latents1 = self._encode(x, encode1, gradients)
        totals, z_own = self._decode(
            latents1, list(zip(decode_index, decode_plans, strict=True)), gradients, len(contexts)
        )
        (cycle1, _), (own, own_log_rate), *rest = [self.model.mean(t) for t in totals]
        # cycle 2 (cycle 1's output, target -> source)
        latents2 = self._encode(cycle1, list(zip(target.T, by_target, strict=True)), gradients)
        (total2,), _ = self._decode(
            latents2, list(zip(source.T, by_source, strict=True)), gradients, 1
        )
        cycle2, cycle2_log_rate = self.model.mean(total2)
        squares = {
            field: _mean_square(head, z, source[:, f], self.model.n_genes)
            for f, field, head, z in zip(columns, self.model.fields, heads, z_own, strict=True)
        }
        return CyclePasses(
            cycle1, own, cycle2, rest[0][0] if rest else None, latents1, latents2, squares,
            own_log_rate, cycle2_log_rate, self.model.log_theta,
        )  # fmt: skip

    def _encode(
        self,
        x: torch.Tensor,
        source: list[tuple[torch.Tensor, MapsPlan | None]],
        gradients: list[MapsGradient | None],
    ) -> list[torch.Tensor]:
        """(B, G) -> every head's (B, L) latent, base first: ``x [W; E_1; ...]^T`` in one matmul,
        then each field's source maps (``source``: per field its (B,) categories and layout)."""
        model = self.model
        encoders = torch.cat([model.base, *(head.encoder.weight for head in model.heads)])
        base_hidden, *encoded = (x @ encoders.T).split(model.latent_dim, dim=1)
        mapped = [
            head.apply_maps(h, index, plan, gradient)
            for head, h, (index, plan), gradient in zip(
                model.heads, encoded, source, gradients, strict=True
            )
        ]
        return [base_hidden, *mapped]

    def _decode(
        self,
        latents: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, MapsPlan | None]],
        gradients: list[MapsGradient | None],
        passes: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode latents (base first) in ``passes`` contexts at once: ``targets`` holds per
        field the (passes B,) categories of every context, one after another, and their layout.

        Returns:
            Every context's (B, G) sum of the heads, ``[h_base, s C_1 h_1, ...] @ [W; D_1^T;
            ...]`` plus the offsets (and the gene bias); and every field's scaled (B, L) latent
            ``s C_f h_f`` in the second context (the self pass's, for the parsimony term; the
            first context's when only one).
        """
        model = self.model
        base_hidden, *hidden = latents
        n = base_hidden.shape[0]
        if not hidden:  # no field heads: the base head alone
            return [model.base_term(base_hidden)] * passes, []
        decoded: list[list[torch.Tensor]] = [[] for _ in range(passes)]  # pass -> field -> z
        for head, h, (index, plan), gradient in zip(
            model.heads, hidden, targets, gradients, strict=True
        ):
            # Every pass's maps in one call: a category's map is read once for all of them.
            mapped = model.logit_scale * head.apply_maps(h.repeat(passes, 1), index, plan, gradient)
            for pass_, part in zip(decoded, mapped.split(n), strict=True):
                pass_.append(part)
        decoders = torch.cat([head.decoder.weight for head in model.heads], dim=1)  # (G, F L)
        shifts = _offsets(model, [index for index, _ in targets], passes, n)
        if passes > 1:  # the base head's term once, for every pass
            base = model.base_term(base_hidden)
            outputs = [
                torch.addmm(base if shift is None else base + shift, torch.cat(z, 1), decoders.T)
                for z, shift in zip(decoded, shifts, strict=True)
            ]
        else:
            stacked = torch.cat([model.base.T, decoders], dim=1)  # (G, (1 + F) L)
            out = torch.cat([base_hidden, *decoded[0]], dim=1) @ stacked.T
            if model.gene_bias is not None:
                out = out + model.gene_bias
            outputs = [out if shifts[0] is None else out + shifts[0]]
        return outputs, decoded[min(1, passes - 1)]


def _gradient(head: FieldHead, device: torch.device) -> MapsGradient | None:
    """A pass's :class:`MapsGradient` for a head whose maps are applied grouped, else None."""
    if resolve_method(head.map_method, device) != "grouped":
        return None
    return MapsGradient(head.sparse_grad)


def _offsets(
    model: CAE, index: list[torch.Tensor], passes: int, n: int
) -> list[torch.Tensor | None]:
    """For each of ``passes`` contexts of ``n`` cells (``index``: per field the (passes n,)
    categories), the (n, G) sum of every field's offsets of those contexts; Nones without offsets.

    One ``embedding_bag`` over the fields' stacked offsets sums the F rows of every cell of
    every pass (about half the time of a gather and an add per field, backward included).
    """
    tables: list[torch.Tensor] = [h.offsets for h in model.heads if h.offsets is not None]
    if not tables:  # (offsets are on every head or on none: one setting)
        return [None] * passes
    sizes = torch.tensor([len(table) for table in tables], device=index[0].device)
    starts = torch.cumsum(sizes, 0) - sizes  # (F,) first row of each field's table
    rows = torch.stack(index, dim=1) + starts  # (passes n, F)
    table = torch.cat(tables) if len(tables) > 1 else tables[0]  # (sum K_f, G)
    summed = nn.functional.embedding_bag(rows, table, mode="sum")
    return list(summed.split(n))


def _mean_square(
    head: FieldHead, z: torch.Tensor, target: torch.Tensor, n_genes: int
) -> torch.Tensor:
    """The mean over cells and genes of a head's squared term ``z D^T + o``, ``o`` the offsets
    ``b[target]`` (target (B,)), from its scaled latents ``z`` (B, L), without forming the (B, G)
    term: ``|z D^T|^2 = sum(z (D^T D) * z)``, plus with offsets ``2 sum(z * (o D)) + |o|^2``
    (``o D`` per category, then gathered, when few)."""
    weight = head.decoder.weight  # (G, L)
    total = ((z @ (weight.T @ weight)) * z).sum()
    if head.offsets is not None:
        if head.offsets.shape[0] <= z.shape[0]:
            projected = (head.offsets @ weight).index_select(0, target)
            squares = head.offsets.square().sum(dim=1).index_select(0, target).sum()
        else:
            offset = head.offsets.index_select(0, target)
            projected, squares = offset @ weight, offset.square().sum()
        total = total + 2 * (z * projected).sum() + squares
    return total / (z.shape[0] * n_genes)
