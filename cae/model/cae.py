"""The context-conditioned cycle autoencoder (CAE): the model as its math.

Expression is explained additively, one term per head::

    x_hat = x_hat_base + sum_f x_hat_f                                  # (B, G)

* base head: a tied, bias-free linear autoencoder, ``h = x W^T`` and ``x_hat_base = h W``;
* one head per metadata field f: an encoder ``E_f`` (G -> L), a decoder ``D_f`` (L -> G), both
  bias-free and untied, and one L x L context map per category of f. Encoding with the source
  contexts gives ``h_f = C_f[source](E_f x)``; decoding to the target contexts gives
  ``x_hat_f = s * D_f(C_f[target] h_f)``, with ``s`` the metadata logit scale, plus the target
  context's gene-space offset ``b_f[target]`` when the model has offsets.

With the count likelihood (``likelihood="nb"``, :mod:`cae.model.likelihood`) the same sum is the
log mean of a negative binomial up to a per-cell constant: the base head gains a per-gene bias,
``log_rate = log_softmax(x_hat)`` is each gene's share of the cell's counts, the mean of a cell of
library size l is ``l exp(log_rate)``, and ``output`` is that mean in model space,
``log1p(10^4 exp(log_rate))``. Contributions and effects are then read on terms centred over genes
(the part of a term that moves the mean).

:meth:`CAE.forward` is that design, written as it reads; it serves evaluation, generation and
serving. Training runs the same math fused across a step's passes
(:class:`cae.train.passes.FusedPasses`), tested equal to this forward.

With ``nonnegative="all"`` (the default) every parameter is kept >= 0
(:meth:`CAE.project_nonnegative` after each optimiser step); ``nonnegative="base"`` keeps only the
base head so, and lets the field heads take either sign (a field's term can then lower genes as a
function of the cell, not only by offsets).
Context maps are applied to the whole batch at once, never in a Python loop over categories
(:mod:`cae.model.context_maps`).
Shapes: B cells, G genes, L latent size, K_f categories of field f (index 0 is ``<unk>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast

import torch
from torch import nn

from cae.model.context_maps import (
    MapsGradient,
    MapsPlan,
    apply_context_maps,
    plan_maps,
    resolve_method,
)
from cae.model.likelihood import expression
from cae.types import ContextMapMethod, Likelihood, Nonnegative

__all__ = [
    "CAE", "CAEOutput", "FieldHead", "Nonnegative", "apply_context_maps", "contribution_l2",
]  # fmt: skip


class CAEOutput(NamedTuple):
    """What one pass of the model computes: the output, every head's term and latent."""

    output: torch.Tensor  # (B, G) x_hat = base + sum of the field terms
    base: torch.Tensor  # (B, G) the base head's term
    fields: dict[str, torch.Tensor]  # field -> (B, G) its head's term (scaled, offsets added)
    base_hidden: torch.Tensor  # (B, L) the base head's latent
    field_hidden: dict[str, torch.Tensor]  # field -> (B, L) its latent after the source map
    # (B, G) log share of the cell's counts per gene, log_softmax(base + sum of fields), with the
    # count likelihood; None with the normal one (cae.model.likelihood)
    log_rate: torch.Tensor | None = None


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
        self,
        h: torch.Tensor,
        index: torch.Tensor,
        plan: MapsPlan | None = None,
        gradient: MapsGradient | None = None,
    ) -> torch.Tensor:
        """(B, L), (B,) -> (B, L): each latent times its category's context map.

        Args:
            h: (B, L) latents.
            index: (B,) int64 category of each cell.
            plan: :meth:`plan` of the same ``index`` made beforehand, or None.
            gradient: the pass's :class:`~cae.model.context_maps.MapsGradient` for these maps,
                which sums the gradients of all their applications at once (training), or None.
        """
        maps, method = self.context_maps, self.map_method
        return apply_context_maps(h, maps, index, method, self.sparse_grad, plan, gradient)

    def offset(self, target: torch.Tensor) -> torch.Tensor | None:
        """(B,) -> (B, G) the target contexts' gene-space offsets, or None without offsets."""
        # index_select, not offsets[target]: its backward (an index_add) is several times faster
        # than indexing's on the CPU.
        return None if self.offsets is None else self.offsets.index_select(0, target)


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
        likelihood: ``"normal"``: the heads' sum is the model-space expression itself (log1p
            counts per 10,000), fitted by mean squared error (the seed's design). ``"nb"``: the
            sum is the log mean of a negative binomial up to a per-cell constant
            (:mod:`cae.model.likelihood`), the base head gains a per-gene bias, and the model has
            a per-gene log inverse dispersion ``log_theta``; ``output`` is then the mean in model
            space. Neither the bias nor the dispersion is kept >= 0.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int,
        field_sizes: dict[str, int],
        logit_scale: float,
        context_offsets: bool = False,
        nonnegative: Nonnegative = "all",
        likelihood: Likelihood = "normal",
    ) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.likelihood = likelihood
        self.nonnegative = nonnegative
        self.latent_dim = latent_dim
        self.fields: tuple[str, ...] = tuple(field_sizes)
        self.logit_scale = logit_scale
        self.base = nn.Parameter(torch.empty(latent_dim, n_genes))  # W: (L, G), tied
        counts = likelihood == "nb"
        # Count likelihood: the base term's per-gene bias and the per-gene log inverse dispersion.
        self.gene_bias = nn.Parameter(torch.zeros(n_genes)) if counts else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if counts else None
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
        self, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor | None = None
    ) -> CAEOutput:
        """Encode ``x`` in its source contexts and decode it in the target contexts.

        Args:
            x: (B, G) model-space expression.
            source: (B, F) int64 category of each cell for each field.
            target: (B, F) int64 categories to decode into; None reconstructs in ``source``.

        Returns:
            The :class:`CAEOutput`: the output, every head's term and latent.
        """
        target = source if target is None else target
        base_hidden = x @ self.base.T  # (B, L)  h = x W^T
        base = self.base_term(base_hidden)  # (B, G)  x_hat_base = h W (+ gene bias)
        field_hidden: dict[str, torch.Tensor] = {}
        fields: dict[str, torch.Tensor] = {}
        for f, (field, head) in enumerate(zip(self.fields, self.heads, strict=True)):
            hidden = head.apply_maps(head.encoder(x), source[:, f])  # (B, L)  C_f[source] E_f x
            mapped = head.apply_maps(hidden, target[:, f])  # (B, L)  C_f[target] h_f
            term = self.logit_scale * head.decoder(mapped)  # (B, G)  s D_f(...)
            offset = head.offset(target[:, f])  # (B, G)  b_f[target], or None
            field_hidden[field] = hidden
            fields[field] = term if offset is None else term + offset
        total = base + sum(fields.values()) if fields else base  # (B, G)
        output, log_rate = self.mean(total)
        return CAEOutput(output, base, fields, base_hidden, field_hidden, log_rate)

    def base_term(self, base_hidden: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, G) the base head's term ``h W``, plus the gene bias with counts."""
        term = base_hidden @ self.base
        return term if self.gene_bias is None else term + self.gene_bias

    def mean(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, G) the heads' sum -> ``(output, log_rate)``: the model-space mean and, with the
        count likelihood, the log share of counts per gene (None with the normal one)."""
        if self.likelihood == "normal":
            return total, None
        log_rate = torch.log_softmax(total.float(), dim=1)
        return expression(log_rate).to(total.dtype), log_rate

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
        # the change first, so that a cell the move leaves alone is x exactly
        return moved._replace(output=(x + (moved.output - own.output)).clamp_min(0.0))

    def field_effects(self, out: CAEOutput) -> dict[str, torch.Tensor]:
        """What each field's value changes: every field head's term minus its mean over the
        field's known categories as targets (uniformly weighted, ``<unk>`` left out), for the same
        encoding. The term is linear in the target's map and offset, so the mean is the head
        decoded through the mean map and mean offset: ``s D_f(mean_k C_f[k] h_f) + mean_k b_f[k]``.

        Args:
            out: a pass of this model (its ``fields`` and ``field_hidden``).

        With the count likelihood each effect is centred over genes (the softmax of the sum ignores
        a per-cell constant, so only the centred part of a term moves the mean).

        Returns:
            ``{field: (B, G)}`` in float32; zeros for a field with no known category.
        """
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
            effects[field] = _identifiable(term - mean, out)
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
        free = {id(self.gene_bias), id(self.log_theta)}  # signed by nature (count likelihood)
        for parameter in self.parameters():
            if id(parameter) in free:
                continue
            changed = rows.get(parameter)
            # Few changed rows: those alone (the others are >= 0 already); else the whole tensor.
            if changed is not None and 3 * len(changed) <= parameter.shape[0]:
                clamped = parameter.index_select(0, changed).clamp_min_(0.0)
                parameter.index_copy_(0, changed, clamped)
            else:
                parameter.clamp_min_(0.0)

    def field_sizes(self) -> dict[str, int]:
        """``{field: K_f}`` as given at construction."""
        return {
            f: head.context_maps.shape[0] for f, head in zip(self.fields, self.heads, strict=True)
        }


def contribution_l2(out: CAEOutput) -> dict[str, torch.Tensor]:
    """Per-cell L2 norm over genes of every head's output: ``{"base": (B,), field: (B,), ...}``
    (with the count likelihood, of each term centred over genes: see :meth:`CAE.field_effects`)."""
    norms = {"base": torch.linalg.vector_norm(_identifiable(out.base, out), dim=1)}
    for field, values in out.fields.items():
        norms[field] = torch.linalg.vector_norm(_identifiable(values, out), dim=1)
    return norms


def _identifiable(term: torch.Tensor, out: CAEOutput) -> torch.Tensor:
    """A (B, G) term of ``out``'s sum as far as it moves the output: centred over genes with the
    count likelihood (a log mean up to a per-cell constant), as it is with the normal one."""
    return term if out.log_rate is None else term - term.mean(dim=1, keepdim=True)
