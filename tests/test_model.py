"""The CAE and the classifier: grouped context maps, additivity, non-negativity, shapes."""

from __future__ import annotations

import pytest
import torch

from cae.data.vocabulary import FieldVocabulary, Vocabularies
from cae.model.cae import CAE, apply_context_maps, contribution_l2
from cae.model.classifier import ContextClassifier
from cae.model.contributions import ContextTable, field_means
from cae.train.passes import CyclePasses, FusedPasses, reference_passes

SIZES = {"cell_type": 6, "assay": 4, "sex": 3}


def naive_context_maps(h: torch.Tensor, maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The seed's approach: group cells by category and loop over categories in Python."""
    out = torch.empty_like(h)
    for category in index.unique().tolist():
        rows = index == category
        out[rows] = h[rows] @ maps[category]
    return out


@pytest.mark.parametrize(("n_categories", "batch", "latent"), [(3, 17, 4), (26, 256, 16)])
def test_grouped_context_maps_equal_the_naive_loop(n_categories, batch, latent):
    generator = torch.Generator().manual_seed(n_categories)
    h = torch.rand(batch, latent, generator=generator, requires_grad=True)
    maps = torch.rand(n_categories, latent, latent, generator=generator, requires_grad=True)
    index = torch.randint(0, n_categories, (batch,), generator=generator)

    grouped = apply_context_maps(h, maps, index)
    naive = naive_context_maps(h, maps, index)
    torch.testing.assert_close(grouped, naive)

    weights = torch.rand(batch, latent, generator=generator)
    grads_grouped = torch.autograd.grad((grouped * weights).sum(), (h, maps))
    grads_naive = torch.autograd.grad((naive * weights).sum(), (h, maps))
    for a, b in zip(grads_grouped, grads_naive, strict=True):
        torch.testing.assert_close(a, b)


def make_model(offsets: bool = True, likelihood: str = "normal") -> CAE:
    torch.manual_seed(0)
    model = CAE(
        n_genes=12, latent_dim=5, field_sizes=SIZES, logit_scale=0.5, context_offsets=offsets,
        likelihood=likelihood,
    )  # fmt: skip
    with torch.no_grad():  # make the heads differ per context, as after training
        if model.gene_bias is not None and model.log_theta is not None:
            model.gene_bias.normal_()
            model.log_theta.normal_()
        for head in model.heads:
            head.context_maps.add_(torch.rand_like(head.context_maps))
            if head.offsets is not None:
                head.offsets.add_(torch.rand_like(head.offsets))
    return model


def contexts(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randint(0, k, (batch,), generator=generator) for k in SIZES.values()], dim=1
    )


def test_forward_shapes_and_output_is_the_sum_of_heads():
    model = make_model()
    x = torch.rand(7, 12)
    out = model(x, contexts(7), contexts(7, seed=1))
    assert out.output.shape == (7, 12)
    assert out.base.shape == (7, 12) and out.base_hidden.shape == (7, 5)
    assert list(out.fields) == list(SIZES) and list(out.field_hidden) == list(SIZES)
    assert all(v.shape == (7, 12) for v in out.fields.values())
    assert all(v.shape == (7, 5) for v in out.field_hidden.values())
    torch.testing.assert_close(out.output, out.base + sum(out.fields.values()))


def test_changing_one_fields_target_changes_only_that_fields_term():
    model = make_model()
    x = torch.rand(9, 12)
    source = contexts(9)
    target = source.clone()
    target[:, 1] = (source[:, 1] % 3) + 1  # another assay for every cell
    own = model(x, source)
    moved = model(x, source, target)
    torch.testing.assert_close(moved.base, own.base)
    torch.testing.assert_close(moved.fields["cell_type"], own.fields["cell_type"])
    torch.testing.assert_close(moved.fields["sex"], own.fields["sex"])
    assert not torch.allclose(moved.fields["assay"], own.fields["assay"])


def test_target_none_reconstructs_in_the_source_contexts():
    model = make_model()
    x, source = torch.rand(5, 12), contexts(5)
    torch.testing.assert_close(model(x, source).output, model(x, source, source).output)


def test_residual_counterfactual_adds_only_the_moved_fields_change_to_the_cell():
    model = make_model()
    x, source = torch.rand(9, 12), contexts(9)
    target = source.clone()
    target[:, 1] = (source[:, 1] % 3) + 1
    kept = model.counterfactual(x, source, source, residual=True)
    torch.testing.assert_close(kept.output, x)  # no move, no change: the cell itself
    moved = model.counterfactual(x, source, target, residual=True)
    change = moved.fields["assay"] - model(x, source).fields["assay"]
    torch.testing.assert_close(moved.output, (x + change).clamp_min(0.0))
    decoded = model.counterfactual(x, source, target, residual=False)
    torch.testing.assert_close(decoded.output, model(x, source, target).output)


def test_project_nonnegative_clamps_every_parameter():
    model = make_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sub_(0.5)
    assert any((p < 0).any() for p in model.parameters())
    model.project_nonnegative()
    assert all((p >= 0).all() for p in model.parameters())


def test_signed_heads_keep_only_the_base_nonnegative():
    model = CAE(12, 5, SIZES, logit_scale=0.5, context_offsets=True, nonnegative="base")
    heads = [p for head in model.heads for p in head.parameters()]
    assert all((head.encoder.weight < 0).any() for head in model.heads)  # signed from the start
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sub_(0.5)
    model.project_nonnegative()
    assert (model.base >= 0).all()
    assert all((p < 0).any() for p in heads)  # encoders, decoders, maps and offsets keep signs


def test_fresh_model_is_nonnegative_with_identity_maps():
    model = CAE(n_genes=12, latent_dim=5, field_sizes=SIZES, logit_scale=0.0159)
    assert all((p >= 0).all() for p in model.parameters())
    for head in model.heads:
        torch.testing.assert_close(head.context_maps[2], torch.eye(5))
        assert head.offsets is None  # the seed's design unless asked for
    assert model.field_sizes() == SIZES


def test_offsets_are_per_context_and_unscaled():
    model = make_model(offsets=True)
    with torch.no_grad():
        for head in model.heads:
            head.decoder.weight.zero_()  # leave only the offsets in the field terms
    x, source = torch.rand(4, 12), contexts(4)
    out = model(x, source)
    for column, (field, head) in enumerate(zip(model.fields, model.heads, strict=True)):
        torch.testing.assert_close(out.fields[field], head.offsets[source[:, column]])


def test_contribution_l2_is_the_gene_wise_norm_of_each_head():
    model = make_model()
    out = model(torch.rand(6, 12), contexts(6))
    norms = contribution_l2(out)
    assert list(norms) == ["base", *SIZES]
    torch.testing.assert_close(norms["sex"], out.fields["sex"].pow(2).sum(dim=1).sqrt())


@pytest.mark.parametrize("offsets", [True, False])
def test_field_effects_are_each_term_minus_its_mean_over_the_known_target_values(offsets):
    model = make_model(offsets)
    x, source = torch.rand(5, 12), contexts(5)
    out = model(x, source)
    effects = model.field_effects(out)
    for column, (field, size) in enumerate(SIZES.items()):
        moved = []
        for value in range(1, size):  # every known value as the target; <unk> (0) left out
            target = source.clone()
            target[:, column] = value
            moved.append(model(x, source, target).fields[field])
        expected = out.fields[field] - torch.stack(moved).mean(dim=0)
        torch.testing.assert_close(effects[field], expected)
    # a head that is the same in every context has no effect, whatever its size
    with torch.no_grad():
        head = model.heads[0]
        head.context_maps.copy_(head.context_maps[1].expand_as(head.context_maps))
        if head.offsets is not None:
            head.offsets.copy_(head.offsets[1].expand_as(head.offsets))
    out = model(x, source)
    assert out.fields["cell_type"].abs().min() > 0
    torch.testing.assert_close(
        model.field_effects(out)["cell_type"], torch.zeros(5, 12), atol=1e-6, rtol=0
    )


def test_context_table_effect_is_the_norm_of_each_values_mean_effect():
    vocabularies = Vocabularies(("sex",), {"sex": FieldVocabulary("sex", ("female", "male"))})
    table = ContextTable(vocabularies, n_genes=2, device=torch.device("cpu"))
    contexts = torch.tensor([[1], [1], [2]])
    norms = {"base": torch.ones(3), "sex": torch.tensor([1.0, 3.0, 2.0])}
    # the two female cells' effects cancel on gene 0: their mean is (0, 1)
    effects = {"sex": torch.tensor([[1.0, 1.0], [-1.0, 1.0], [3.0, 4.0]])}
    table.add(contexts, norms, effects)
    frame = table.frame().set_index("value")
    assert frame.loc["female", "contrib_l2"] == 2.0 and frame.loc["male", "contrib_l2"] == 2.0
    assert frame.loc["female", "effect_l2"] == pytest.approx(1.0)
    assert frame.loc["male", "effect_l2"] == pytest.approx(5.0)
    means = field_means(frame.reset_index(), "effect_l2")
    assert means == {"sex": pytest.approx((2 * 1.0 + 5.0) / 3)}


def passes_loss(passes: CyclePasses) -> torch.Tensor:
    """A loss that reads every output of the passes, each weighed differently."""
    total = passes.cycle1.square().sum() + 2 * passes.own.sum() + 3 * passes.cycle2.sum()
    if passes.moved is not None:
        total = total + 4 * passes.moved.sum()
    latents = passes.latents1 + passes.latents2
    total = total + sum((i + 1) * h.sum() for i, h in enumerate(latents))
    total = total + sum(passes.squares.values())
    if passes.own_log_rate is not None and passes.cycle2_log_rate is not None:
        total = total + 5 * passes.own_log_rate.sum() + 6 * passes.cycle2_log_rate.square().sum()
    return total if passes.log_theta is None else total + passes.log_theta.sum()


@pytest.mark.parametrize(
    ("offsets", "likelihood"), [(True, "normal"), (False, "normal"), (True, "nb")]
)
@pytest.mark.parametrize("batch", [4, 9, 40])  # fewer and more cells than a field's categories
@pytest.mark.parametrize("moved", [True, False])
@pytest.mark.parametrize(
    ("method", "sparse"), [("grouped", True), ("grouped", False), ("gather", False)]
)
def test_the_fused_passes_equal_the_models_forward(
    offsets, likelihood, batch, moved, method, sparse
):
    """The training step's fused passes give the outputs, latents, parsimony squares, log
    rates and gradients of the passes as calls of the model's forward (the contract between
    them), for both likelihoods."""
    # The count likelihood's exp and log amplify float32 rounding: compared in float64.
    dtype = torch.float64 if likelihood == "nb" else torch.float32
    model = make_model(offsets, likelihood).to(dtype)
    x, source, target = torch.rand(batch, 12, dtype=dtype), contexts(batch), contexts(batch, seed=2)
    moves = contexts(batch, seed=3) if moved else None
    results = []
    for fused in (False, True):
        model.configure_context_maps(method, sparse_grad=sparse)
        model.zero_grad(set_to_none=True)
        if fused:
            passes = FusedPasses(model)(x, source, target, moves)
        else:
            passes, _ = reference_passes(model, x, source, target, moves)
        passes_loss(passes).backward()
        grads = [p.grad.to_dense() for p in model.parameters()]
        results.append((passes, grads))
        if sparse:  # only the categories the batch used have gradient rows
            assert all(head.context_maps.grad.is_sparse for head in model.heads)
    (reference, reference_grads), (fused, fused_grads) = results
    for name in CyclePasses._fields:
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), msg=name)
    assert (fused.own_log_rate is None) == (likelihood == "normal")
    for a, b in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_fused_passes_gradient_equals_autograd_grad():
    """The maps' gradient summed over a pass's applications is ordinary autograd output:
    ``torch.autograd.grad`` sees the same as ``backward()``."""
    model = make_model()
    model.configure_context_maps("grouped", sparse_grad=False)
    x, source, target = torch.rand(30, 12), contexts(30), contexts(30, seed=2)
    maps = [head.context_maps for head in model.heads]
    grads = torch.autograd.grad(passes_loss(FusedPasses(model)(x, source, target)), maps)
    passes_loss(FusedPasses(model)(x, source, target)).backward()
    for grad, parameter in zip(grads, maps, strict=True):
        torch.testing.assert_close(grad, parameter.grad)


def test_classifier_has_one_head_per_field():
    classifier = ContextClassifier(n_genes=12, hidden=8, field_sizes=SIZES)
    logits = classifier(torch.rand(3, 12))
    assert [tuple(t.shape) for t in logits] == [(3, k) for k in SIZES.values()]
