"""The context-conditioned cycle autoencoder (CAE), readable in one sitting.

Expression is explained additively, one term per head::

    x_hat = x_hat_base + sum_f x_hat_f                                  # (B, G)

* base head: a tied, bias-free linear autoencoder, ``h = x W^T`` and ``x_hat_base = h W``;
* one head per metadata field f: an encoder ``E_f`` (G -> L), a decoder ``D_f`` (L -> G), both
  bias-free and untied, and one L x L context map per category of f. Encoding with the source
  contexts gives ``h_f = C_f[source](E_f x)``; decoding to the target contexts gives
  ``x_hat_f = s * D_f(C_f[target] h_f)``, with ``s`` the metadata logit scale, plus the target
  context's gene-space offset ``b_f[target]`` when the model has offsets.

With ``nonnegative="all"`` (the default, the seed's design) every parameter is kept >= 0
(:meth:`CAE.project_nonnegative` after each optimiser step); ``nonnegative="base"`` keeps only the
base head so, and lets the field heads take either sign (a field's term can then lower genes as a
function of the cell, not only by offsets).
Context maps are applied to the whole batch at once, never in a Python loop over categories
(:mod:`cae.model.context_maps`). All heads encode in one matmul; a training step's passes
(``terms=False``) decode only the sum of the heads, in one matmul over all their latents.
Shapes: B cells, G genes, L latent size, K_f categories of field f (index 0 is ``<unk>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast

import torch
from torch import nn

from cae.model.context_maps import (
    MapsPlan,
    apply_context_maps,
    plan_maps,
    resolve_method,
)
from cae.types import ContextMapMethod, Nonnegative

__all__ = [
    "CAE", "CAEOutput", "FieldHead", "Nonnegative", "apply_context_maps", "contribution_l2",
]  # fmt: skip


class CAEOutput(NamedTuple):
    """Everything one forward pass computes; contributions come free from the per-head outputs."""

    output: torch.Tensor  # (B, G) base + sum of field heads
    # (B, G) base head output, and field -> (B, G) scaled field head output; None and {} when the
    # pass was asked for its sum only (forward(..., terms=False)).
    base: torch.Tensor | None
    fields: dict[str, torch.Tensor]
    base_hidden: torch.Tensor  # (B, L) base head latent
    field_hidden: dict[str, torch.Tensor]  # field -> (B, L) latent after the source context map
    # The same cells decoded in their source contexts (forward(..., and_source=True)): it shares
    # the encoding, so the self pass of a training step costs only its decoders.
    own: CAEOutput | None = None
    # On that self pass: field -> the mean over cells and genes of its head's squared output
    # (the parsimony term), computed without the (B, G) outputs when terms=False.
    squares: dict[str, torch.Tensor] | None = None
    # The same encoding decoded in further target contexts (forward(..., also=...)), in order.
    also: tuple[CAEOutput, ...] = ()


class FieldHead(nn.Module):
    """One metadata field's encoder, decoder and per-category context maps (no output scale)."""

    def __init__(self, n_genes: int, latent_dim: int, n_contexts: int, offsets: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(n_genes, latent_dim, bias=False)  # E_f: G -> L
        self.decoder = nn.Linear(latent_dim, n_genes, bias=False)  # D_f: L -> G
        # Identity maps: every context starts out the same and learns to differ.
        self.context_maps = nn.Parameter(torch.eye(latent_dim).repeat(n_contexts, 1, 1))
        # Optional per-context gene-space offsets b_f[k] (K, G), zero at first.
        self.offsets = nn.Parameter(torch.zeros(n_contexts, n_genes)) if offsets else None
        # How the maps are applied (cae.model.context_maps); not part of the state.
        self.map_method: ContextMapMethod = "auto"
        self.sparse_grad = False

    def plan(self, index: torch.Tensor) -> MapsPlan | None:
        """The layout of one application of the maps to cells of categories ``index`` (B,), made
        ahead of it (see :func:`cae.model.context_maps.plan_maps`); None where the maps are not
        applied grouped, or for no cells."""
        method = resolve_method(self.map_method, index.device)
        if method != "grouped" or index.numel() == 0:
            return None
        return plan_maps(index, self.context_maps.shape[1], self.context_maps.shape[0])

    def apply_maps(
        self, h: torch.Tensor, index: torch.Tensor, plan: MapsPlan | None = None
    ) -> torch.Tensor:
        """(B, L), (B,) -> (B, L): each latent times its category's context map (``plan``: from
        :meth:`plan` for the same ``index``, or None)."""
        maps, method = self.context_maps, self.map_method
        return apply_context_maps(h, maps, index, method, self.sparse_grad, plan)

    def decode(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, G): expression of each latent in its target context, unscaled."""
        return self.decoder(self.apply_maps(h, target))

    def offset(self, target: torch.Tensor) -> torch.Tensor | None:
        """(B,) -> (B, G) the target contexts' gene-space offsets, or None without offsets."""
        # index_select, not offsets[target]: its backward (an index_add) is several times faster
        # than indexing's on the CPU.
        return None if self.offsets is None else self.offsets.index_select(0, target)

    def mean_square(self, z: torch.Tensor, target: torch.Tensor, n_genes: int) -> torch.Tensor:
        """The mean over cells and genes of the squared output ``z D^T + o``, ``o`` the offsets
        ``b[target]`` (target (B,)), from scaled latents ``z`` (B, L), without forming the (B, G)
        output: ``|z D^T|^2 = sum(z (D^T D) * z)``, plus with offsets ``2 sum(z * (o D)) + |o|^2``
        (``o D`` per category, then gathered, when few)."""
        weight = self.decoder.weight  # (G, L)
        total = ((z @ (weight.T @ weight)) * z).sum()
        if self.offsets is not None:
            if self.offsets.shape[0] <= z.shape[0]:
                projected = (self.offsets @ weight).index_select(0, target)
                squares = self.offsets.square().sum(dim=1).index_select(0, target).sum()
            else:
                offset = self.offsets.index_select(0, target)
                projected, squares = offset @ weight, offset.square().sum()
            total = total + 2 * (z * projected).sum() + squares
        return total / (z.shape[0] * n_genes)


class CAE(nn.Module):
    """Base head plus one :class:`FieldHead` per metadata field; every parameter kept >= 0, or
    only the base head's (``nonnegative``).

    Args:
        n_genes: G, genes per cell.
        latent_dim: L, latent size of every head.
        field_sizes: ``{field: K_f}``, categories per field including the ``<unk>`` index 0, in the
            column order of the context tensors.
        logit_scale: s, the scale of every field head's decoder output (the seed's 0.0159).
        context_offsets: give every context of every field a learned gene-space offset (zero at
            first; kept >= 0 with ``nonnegative="all"``) added (unscaled) to its head's output:
            ``x_hat_f = s * D_f(...) + b_f[target]``.
            An extension of the seed's design (False restores it); the output stays a sum of
            per-field gene-space terms.
        nonnegative: ``"all"`` keeps every parameter >= 0 (the seed's design); ``"base"`` only the
            base head, so that field heads (encoders, decoders, maps, offsets) take either sign and
            start as signed uniforms of the same size.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int,
        field_sizes: dict[str, int],
        logit_scale: float,
        context_offsets: bool = False,
        nonnegative: Nonnegative = "all",
    ) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.nonnegative = nonnegative
        self.latent_dim = latent_dim
        self.fields: tuple[str, ...] = tuple(field_sizes)
        self.logit_scale = logit_scale
        self.base = nn.Parameter(torch.empty(latent_dim, n_genes))  # W: (L, G), tied
        # One FieldHead per field, in field order: an nn.ModuleList (so its parameters are the
        # model's), typed as the read-only sequence of FieldHead the model uses it as.
        self.heads = cast(
            "Sequence[FieldHead]",
            nn.ModuleList(
                FieldHead(n_genes, latent_dim, size, context_offsets)
                for size in field_sizes.values()
            ),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights sized so that an untrained base head roughly reproduces the scale of its
        input (U(0, a) with a = 2 / sqrt(L G)); field encoders and decoders the same, or U(-a, a)
        when signed. Context maps (identity) and offsets (zero) keep their initial values."""
        bound = 2.0 / math.sqrt(self.latent_dim * self.n_genes)
        low = 0.0 if self.nonnegative == "all" else -bound
        nn.init.uniform_(self.base, 0.0, bound)
        for head in self.heads:
            nn.init.uniform_(head.encoder.weight, low, bound)
            nn.init.uniform_(head.decoder.weight, low, bound)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        and_source: bool = False,
        terms: bool = True,
        also: Sequence[torch.Tensor] = (),
    ) -> CAEOutput:
        """Encode ``x`` in its source contexts and decode it in the target contexts.

        All heads encode in one matmul. With ``terms`` every head's (B, G) output is computed and
        summed; without, only the sum, as one matmul over every head's latent (what a training
        step needs, and faster: no (B, G) per head, larger matmuls).

        Args:
            x: (B, G) model-space expression.
            source: (B, F) int64 category of each cell for each field.
            target: (B, F) int64 categories to decode into; ``None`` reconstructs in ``source``.
            and_source: also decode the same encoding in the source contexts (``.own``, with
                ``squares``).
            terms: return every head's output (``base``, ``fields``: contributions); False
                leaves them None and {}.
            also: further (B, F) target contexts to decode the same encoding in (``.also``: the
                same as calling the model with each, one encoding cheaper).

        Returns:
            A :class:`CAEOutput` with the summed output, the heads' outputs and the latents.
        """
        target = source if target is None else target
        latent = self.latent_dim
        sums = not terms and bool(self.heads)  # decode only the sums (a training step's passes)
        heads = list(self.heads)
        encode = [source[:, column] for column in range(len(heads))]  # each head's categories
        contexts: list[torch.Tensor] = []  # the passes decoded together (their sums only)
        decoding: list[tuple[torch.Tensor, MapsPlan | None]] = []
        # Every application's layout first, one after another: host work, faster with the host's
        # caches warm than each just before its matmul, after the previous one's.
        encode_plans = [head.plan(index) for head, index in zip(heads, encode, strict=True)]
        if sums:
            contexts = [target, source, *also] if and_source else [target, *also]
            for column, head in enumerate(heads):  # a head's categories, pass after pass
                index = torch.cat([c[:, column] for c in contexts])
                decoding.append((index, head.plan(index)))
        encoders = torch.cat([self.base, *(head.encoder.weight for head in self.heads)])
        base_hidden, *encoded = (x @ encoders.T).split(latent, dim=1)  # (B, L) each
        field_hidden = {
            field: head.apply_maps(h, index, plan)  # (B, L)
            for field, head, h, index, plan in zip(
                self.fields, heads, encoded, encode, encode_plans, strict=True
            )
        }
        if not sums:
            base = base_hidden @ self.base  # (B, G)
            out = self._decode(base, base_hidden, field_hidden, target)
            more = tuple(self._decode(base, base_hidden, field_hidden, t) for t in also)
            out = out._replace(also=more)
            if not and_source:
                return out
            own = self._decode(base, base_hidden, field_hidden, source)
            squares = {f: values.square().mean() for f, values in own.fields.items()}
            return out._replace(own=own._replace(squares=squares))
        return self._decode_sum(
            x, base_hidden, field_hidden, source, contexts, decoding, and_source
        )

    def _decode(
        self,
        base: torch.Tensor,
        base_hidden: torch.Tensor,
        field_hidden: dict[str, torch.Tensor],
        target: torch.Tensor,
    ) -> CAEOutput:
        """Decode encoded cells in the ``target`` contexts (B, F) and sum the heads."""
        fields: dict[str, torch.Tensor] = {}
        for column, (field, head) in enumerate(zip(self.fields, self.heads, strict=True)):
            hidden = field_hidden[field]
            values = self.logit_scale * head.decode(hidden, target[:, column])  # (B, G)
            offset = head.offset(target[:, column])
            fields[field] = values if offset is None else values + offset
        output = base + sum(fields.values()) if fields else base
        return CAEOutput(output, base, fields, base_hidden, field_hidden)

    def _decode_sum(
        self,
        x: torch.Tensor,
        base_hidden: torch.Tensor,
        field_hidden: dict[str, torch.Tensor],
        source: torch.Tensor,
        contexts: list[torch.Tensor],
        decoding: list[tuple[torch.Tensor, MapsPlan | None]],
        and_source: bool,
    ) -> CAEOutput:
        """The summed output in each of the ``contexts`` (the pass's own target, with
        ``and_source`` the source, then the ``.also`` targets), one matmul each:
        ``[h_base, s C_1 h_1, ...] @ [W; D_1^T; ...]`` plus the offsets. ``decoding`` holds per
        field the categories of every context, one after another, and their layout."""
        n = x.shape[0]
        decoded: list[list[torch.Tensor]] = [[] for _ in contexts]  # per pass, field -> (B, L)
        for field, head, (index, plan) in zip(self.fields, self.heads, decoding, strict=True):
            # Every pass's maps in one call: a category's map is read once for all of them.
            hidden = field_hidden[field].repeat(len(contexts), 1)
            mapped = self.logit_scale * head.apply_maps(hidden, index, plan)
            for pass_, part in zip(decoded, mapped.split(n), strict=True):
                pass_.append(part)
        decoders = torch.cat([head.decoder.weight for head in self.heads], dim=1)  # (G, F L)
        shifts = self._offsets(contexts)
        if len(contexts) > 1:  # the base head's term once, for every pass
            base = base_hidden @ self.base
            outputs = [
                torch.addmm(base if shift is None else base + shift, torch.cat(z, 1), decoders.T)
                for z, shift in zip(decoded, shifts, strict=True)
            ]
        else:
            stacked = torch.cat([self.base.T, decoders], dim=1)  # (G, (1 + F) L)
            out = torch.cat([base_hidden, *decoded[0]], dim=1) @ stacked.T
            outputs = [out if shifts[0] is None else out + shifts[0]]
        more = tuple(
            CAEOutput(output, None, {}, base_hidden, field_hidden)
            for output in outputs[2 if and_source else 1 :]
        )
        result = CAEOutput(outputs[0], None, {}, base_hidden, field_hidden, also=more)
        if not and_source:
            return result
        squares = {
            field: head.mean_square(decoded[1][column], source[:, column], self.n_genes)
            for column, (field, head) in enumerate(zip(self.fields, self.heads, strict=True))
        }
        own = CAEOutput(outputs[1], None, {}, base_hidden, field_hidden, squares=squares)
        return result._replace(own=own)

    def _offsets(self, contexts: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """For each (B, F) batch of contexts, the (B, G) sum of every field's offsets of those
        contexts; Nones without offsets.

        One ``embedding_bag`` over the fields' stacked offsets sums the F rows of every cell of
        every batch (about half the time of a gather and an add per field, backward included).
        """
        tables: list[torch.Tensor] = [h.offsets for h in self.heads if h.offsets is not None]
        if not tables:  # (offsets are on every head or on none: one setting)
            return [None] * len(contexts)
        sizes = torch.tensor([len(table) for table in tables], device=contexts[0].device)
        starts = torch.cumsum(sizes, 0) - sizes  # (F,) first row of each field's table
        rows = torch.cat(list(contexts)) + starts  # (n B, F)
        table = torch.cat(tables) if len(tables) > 1 else tables[0]  # (sum K_f, G)
        summed = nn.functional.embedding_bag(rows, table, mode="sum")
        return list(summed.split(contexts[0].shape[0]))

    def counterfactual(
        self, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, residual: bool
    ) -> CAEOutput:
        """Move cells from their source contexts to target contexts.

        Args:
            x: (B, G) model-space expression (non-negative).
            source: (B, F) the cells' categories.
            target: (B, F) the categories to move them to.
            residual: keep the cell and add only what the move changes,
                ``x + model(x, source -> target) - model(x, source -> source)`` clamped at 0 (the
                base head cancels, so detail the autoencoder cannot reconstruct is kept); False
                decodes, ``model(x, source -> target)`` (the seed's design).

        Returns:
            The moved pass's :class:`CAEOutput` with ``output`` the counterfactual.
        """
        moved = self(x, source, target)
        if not residual:
            return moved
        own = self(x, source)
        return moved._replace(output=(x + moved.output - own.output).clamp_min(0.0))

    def field_effects(self, out: CAEOutput) -> dict[str, torch.Tensor]:
        """What each field's value changes: every field head's term minus its mean over the
        field's known categories as targets (uniformly weighted, ``<unk>`` left out), for the same
        encoding. The term is linear in the target's map and offset, so the mean is the head
        decoded through the mean map and mean offset: ``s D_f(mean_k C_f[k] h_f) + mean_k b_f[k]``.

        Args:
            out: a pass computed with ``terms=True`` (its ``fields`` and ``field_hidden``).

        Returns:
            ``{field: (B, G)}`` in float32; zeros for a field with no known category.

        Raises:
            ValueError: ``out`` holds no per-head terms.
        """
        if self.heads and not out.fields:
            raise ValueError("field_effects needs a pass computed with terms=True")
        effects = {}
        for field, head in zip(self.fields, self.heads, strict=True):
            term = out.fields[field].float()  # (a pass under bf16 autocast: in float32)
            if head.context_maps.shape[0] < 2:
                effects[field] = torch.zeros_like(term)
                continue
            mean_map = head.context_maps[1:].mean(dim=0)  # (L, L)
            mean = self.logit_scale * head.decoder(out.field_hidden[field].float() @ mean_map)
            if head.offsets is not None:
                mean = mean + head.offsets[1:].mean(dim=0)
            effects[field] = term - mean
        return effects

    def configure_context_maps(self, method: ContextMapMethod, sparse_grad: bool) -> None:
        """Choose how every head applies its context maps (see :mod:`cae.model.context_maps`):
        ``auto``, ``grouped`` or ``gather``, and whether ``grouped`` gives the maps a gradient that
        is sparse in the categories (for :class:`cae.train.optim.ContextAdam`)."""
        for head in self.heads:
            head.map_method = method
            head.sparse_grad = sparse_grad

    def row_parameters(self) -> list[nn.Parameter]:
        """The per-category parameters (context maps): updated only where a batch touched them."""
        return [head.context_maps for head in self.heads]

    @torch.no_grad()
    def project_nonnegative(self, rows: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Clamp every parameter (the base head alone with ``nonnegative="base"``) to >= 0 in
        place (call after each optimiser step).

        Args:
            rows: for some parameters, the only rows (first-dimension indices) that changed; those
                parameters are clamped there only, or whole when more than a third of the rows
                changed (one call; the other rows are >= 0 already) (the optimiser's
                ``updated_rows``).
        """
        if self.nonnegative == "base":
            self.base.clamp_min_(0.0)
            return
        rows = rows or {}
        dense: list[torch.Tensor] = [p for p in self.parameters() if p not in rows]
        if dense:
            torch._foreach_clamp_min_(dense, 0.0)
        for parameter, changed in rows.items():  # one pass over the changed rows, in place
            if 3 * len(changed) > parameter.shape[0]:  # many rows: one call beats one per row
                parameter.clamp_min_(0.0)  # (the other rows are >= 0 already)
                continue
            views = parameter.unbind(0)
            torch._foreach_clamp_min_([views[i] for i in changed.tolist()], 0.0)

    def field_sizes(self) -> dict[str, int]:
        """``{field: K_f}`` as given at construction."""
        return {
            f: head.context_maps.shape[0] for f, head in zip(self.fields, self.heads, strict=True)
        }


def contribution_l2(out: CAEOutput) -> dict[str, torch.Tensor]:
    """Per-cell L2 norm over genes of every head's output: ``{"base": (B,), field: (B,), ...}``."""
    norms = {"base": torch.linalg.vector_norm(out.base, dim=1)}
    for field, values in out.fields.items():
        norms[field] = torch.linalg.vector_norm(values, dim=1)
    return norms
