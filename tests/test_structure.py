"""Structured sparsity (granet.sparsity.structure): parsing, layer checks, row views, exact per-group and
per-row selection with the library's tie rule, drop and regrow within a structure, the schedule mapping,
random structured masks and the checker."""
from __future__ import annotations

import pytest
import torch

from granet.kernels.topk import select_top_plain
from granet.sparsity.schedules import PruningSchedule
from granet.sparsity.structure import (
    UNSTRUCTURED,
    Structure,
    Violation,
    active_counts,
    check_layer,
    contested_ties,
    drop_and_regrow,
    fan_in_count,
    from_rows,
    group_counts,
    is_structured,
    keep_top_per_group,
    keep_top_per_row,
    nm_count,
    parse_structure,
    random_structured_mask,
    room,
    row_counts,
    row_shape,
    rows_view,
    select_per_group,
    select_per_row,
    select_structured,
    structure_violations,
)

NM = Structure("n:m", 2, 4)
FAN_IN = Structure("fan-in")

# (shape, unit_dim): Linear out × in, Conv2d (out, in, kh, kw) with rows of 4*3*3 = 36, transformers'
# Conv1D in × out, ConvTranspose2d (in, out, kh, kw) with rows of 6*2*2 = 24.
SHAPES = [((8, 16), 0), ((6, 4, 3, 3), 0), ((16, 12), 1), ((6, 5, 2, 2), 1)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tied_scores(shape, seed: int, levels: int = 3) -> torch.Tensor:
    """Scores with many exact ties: small integers as floats."""
    return torch.randint(0, levels, tuple(shape), generator=gen(seed)).float()


def reference(values: torch.Tensor, valid: torch.Tensor, counts: list[int],
              generator) -> torch.Tensor:
    """The documented rule, row by row in Python: per row the count-th highest competing value is the
    threshold; a row whose ties all fit keeps them; the contested ties of all rows, listed in flat
    order, are ordered by one randperm (identity without a generator) and each row takes its first ones."""
    rows, length = values.shape
    out = torch.zeros(rows, length, dtype=torch.bool)
    contested, slots = [], {}
    for r in range(rows):
        k = counts[r]
        if k == 0:
            continue
        comp = [j for j in range(length) if valid[r, j]]
        thr = sorted((float(values[r, j]) for j in comp), reverse=True)[k - 1]
        above = [j for j in comp if float(values[r, j]) > thr]
        ties = [j for j in comp if float(values[r, j]) == thr]
        for j in above:
            out[r, j] = True
        left = k - len(above)
        if len(ties) <= left:
            for j in ties:
                out[r, j] = True
        else:
            contested += [(r, j) for j in ties]
            slots[r] = left
    if contested:
        order = (torch.randperm(len(contested), generator=generator).tolist() if generator is not None
                 else list(range(len(contested))))
        for p in order:
            r, j = contested[p]
            if slots[r] > 0:
                out[r, j] = True
                slots[r] -= 1
    return out


# ------------------------------------------------------------------------------------------------ parsing

def test_parse_valid_and_round_trip():
    assert parse_structure("2:4") == Structure("n:m", 2, 4)
    assert parse_structure("1:8") == Structure("n:m", 1, 8)
    assert parse_structure("fan-in") == FAN_IN
    assert parse_structure("unstructured") == UNSTRUCTURED
    for text in ("2:4", "3:16", "fan-in", "unstructured"):
        assert str(parse_structure(text)) == text
    assert NM.density == 0.5 and FAN_IN.density is None
    assert NM.structured and FAN_IN.structured and not UNSTRUCTURED.structured


@pytest.mark.parametrize("text, message", [
    ("3:2", "structure '3:2' asks for 3 active weights in groups of 2: N must be at most M"),
    ("0:4", "structure '0:4' keeps no weight: N must be at least 1"),
    ("2:0", "structure '2:0' has groups of 0 weights: M must be at least 1"),
    ("4:4", "structure '4:4' keeps every weight: dense is not a structure (N must be less than M)"),
    ("2-4", "structure '2-4' is not unstructured, fan-in or N:M (such as 2:4)"),
    ("fanin", "structure 'fanin' is not unstructured, fan-in or N:M (such as 2:4)"),
    (" 2:4", "structure ' 2:4' is not unstructured, fan-in or N:M (such as 2:4)"),
    ("-1:4", "structure '-1:4' is not unstructured, fan-in or N:M (such as 2:4)"),
    ("", "structure '' is not unstructured, fan-in or N:M (such as 2:4)"),
    (124, "structure must be text such as '2:4', got 124 (YAML reads an unquoted 2:4 as the base-60 number 124: "
          "quote it)"),
    (None, "structure must be text such as '2:4', got None"),
    (0.5, "structure must be text such as '2:4', got 0.5"),
])
def test_parse_errors_exact(text, message):
    with pytest.raises(ValueError) as info:
        parse_structure(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_structure_constructor_refuses_bad_fields():
    with pytest.raises(ValueError, match=r"^structure kind 'nm' is not one of unstructured, n:m, fan-in$"):
        Structure("nm", 2, 4)
    with pytest.raises(ValueError, match=r"^an N:M structure needs whole numbers 1 <= N < M, got N=4, M=4$"):
        Structure("n:m", 4, 4)
    with pytest.raises(ValueError, match=r"^a fan-in structure has no N and M, got N=2, M=4$"):
        Structure("fan-in", 2, 4)


# ------------------------------------------------------------------------------------------------ layers and rows

def test_check_layer_fits_and_exact_messages():
    check_layer(NM, "fc.weight", (8, 16))
    check_layer(NM, "conv.weight", (16, 4, 3, 3))  # 36 = 9 groups of 4
    check_layer(NM, "attn.c_attn.weight", (12, 8), unit_dim=1)  # Conv1D in × out: rows of 12
    check_layer(FAN_IN, "conv1.weight", (64, 3, 3, 3))
    check_layer(UNSTRUCTURED, "anything", (5,))
    with pytest.raises(ValueError) as info:
        check_layer(NM, "conv1.weight", (64, 3, 3, 3))
    assert str(info.value) == ("structure 2:4 does not fit conv1.weight (shape (64, 3, 3, 3)): each output unit has "
                               "27 inputs (3 × 3 × 3), not a multiple of 4; keep the layer dense")
    with pytest.raises(ValueError) as info:
        check_layer(Structure("n:m", 2, 4), "h.0.mlp.c_fc.weight", (10, 8), unit_dim=1)
    assert str(info.value) == ("structure 2:4 does not fit h.0.mlp.c_fc.weight (shape (10, 8)): each output unit has "
                               "10 inputs (10), not a multiple of 4; keep the layer dense")
    with pytest.raises(ValueError, match=r"^bias has shape \(8,\): structured sparsity needs a weight of 2 or more"):
        check_layer(FAN_IN, "bias", (8,))
    with pytest.raises(ValueError, match=r"^fc.weight has 2 dimensions: unit_dim must be in \[0, 2\), got 2$"):
        check_layer(NM, "fc.weight", (8, 16), unit_dim=2)


@pytest.mark.parametrize("shape, unit_dim", SHAPES)
def test_rows_view_round_trip_and_row_order(shape, unit_dim):
    w = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    rows = rows_view(w, unit_dim)
    assert tuple(rows.shape) == row_shape(shape, unit_dim)
    for r in range(rows.shape[0]):  # row r = unit r's entries, in index order after moving unit_dim first
        assert torch.equal(rows[r], w.movedim(unit_dim, 0)[r].reshape(-1))
    assert torch.equal(from_rows(rows, shape, unit_dim), w)


def test_rows_view_is_a_view_where_the_layout_allows():
    linear = torch.zeros(8, 16)
    conv = torch.zeros(6, 4, 3, 3)
    conv1d = torch.zeros(16, 12)
    for t, dim in ((linear, 0), (conv, 0), (conv1d, 1)):
        view = rows_view(t, dim)
        view[1, 2] = 7.0  # writes the weight
        assert float(t.movedim(dim, 0)[1].reshape(-1)[2]) == 7.0
        back = from_rows(view, t.shape, dim)
        assert back.data_ptr() == t.data_ptr()
    transposed = torch.zeros(6, 5, 2, 2)  # (in, out, kh, kw), unit_dim 1: rows need a copy
    assert rows_view(transposed, 1).data_ptr() != transposed.data_ptr()
    with pytest.raises(ValueError, match=r"^rows of shape \(3, 4\) do not make a weight of shape \(4, 4\)"):
        from_rows(torch.zeros(3, 4), (4, 4))


def test_counts_of_a_mask():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert row_counts(mask).tolist() == [3, 5]
    assert group_counts(mask, 4).tolist() == [[2, 1], [4, 1]]
    assert row_counts(mask.t().contiguous(), unit_dim=1).tolist() == [3, 5]
    assert group_counts(mask.t().contiguous(), 4, unit_dim=1).tolist() == [[2, 1], [4, 1]]
    assert torch.equal(active_counts(mask, NM), group_counts(mask, 4))
    assert torch.equal(active_counts(mask, FAN_IN), row_counts(mask))


# ------------------------------------------------------------------------------------------------ exact selection

def test_tiny_worked_example():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2, 0.2, 0.2, 0.8]])
    # groups [0.9 0.1 0.5 0.3] -> 0.9, 0.5; [0.2 0.2 0.2 0.8] -> 0.8 and the first 0.2 without a generator
    assert keep_top_per_group(scores, 4, 2).int().tolist() == [[1, 0, 1, 0, 1, 0, 0, 1]]
    assert keep_top_per_row(scores, 3).int().tolist() == [[1, 0, 1, 0, 0, 0, 0, 1]]
    # among the inactive entries of a mask: each group regrows its count
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    grown = select_per_group(scores, 4, torch.tensor([[1, 1]]), among=mask, outside=True)
    assert grown.int().tolist() == [[0, 0, 1, 0, 1, 0, 0, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_one_row_is_select_top_plain_bit_for_bit(seed):
    """One row (or one group) is the library's definition of top-k, generator use included."""
    scores = tied_scores((1, 40), seed)
    for k in (0, 1, 7, 20, 39, 40):
        g1, g2 = gen(100 + seed), gen(100 + seed)
        assert torch.equal(select_per_row(scores, k, g1), select_top_plain(scores, k, g2))
        assert torch.equal(torch.randperm(50, generator=g1), torch.randperm(50, generator=g2))  # same draws
        assert torch.equal(select_per_group(scores, 40, k, gen(seed)), select_top_plain(scores, k, gen(seed)))
    assert torch.equal(select_per_row(scores, 20), select_top_plain(scores, 20))  # no generator: lowest indices


@pytest.mark.parametrize("shape, unit_dim", SHAPES)
@pytest.mark.parametrize("levels", [1, 3, 1000])
def test_per_group_and_per_row_match_the_rule(shape, unit_dim, levels):
    """Exact counts in every group and row, and the documented tie rule, with all-equal scores (levels 1),
    many equal ones (3) and few (1000); counts per group and per row; among / outside subsets."""
    rows, row_len = row_shape(shape, unit_dim)
    for seed in range(3):
        scores = tied_scores(shape, seed, levels)
        values = rows_view(scores, unit_dim)
        everything = torch.ones(rows, row_len, dtype=torch.bool)
        for generator_seed in (None, 7):
            g = None if generator_seed is None else gen(generator_seed)
            mask = keep_top_per_group(scores, 4, 2, g, unit_dim=unit_dim)
            assert mask.shape == scores.shape and mask.is_contiguous()
            assert group_counts(mask, 4, unit_dim).eq(2).all()
            g = None if generator_seed is None else gen(generator_seed)
            groups = values.reshape(-1, 4)
            expected = reference(groups, everything.reshape(-1, 4), [2] * groups.shape[0], g)
            assert torch.equal(rows_view(mask, unit_dim).reshape(-1, 4), expected)

            g = None if generator_seed is None else gen(generator_seed)
            mask = keep_top_per_row(scores, 5, g, unit_dim=unit_dim)
            assert row_counts(mask, unit_dim).eq(5).all()
            g = None if generator_seed is None else gen(generator_seed)
            assert torch.equal(rows_view(mask, unit_dim), reference(values, everything, [5] * rows, g))

        # among a random subset, a count per group; outside it, a count per row
        active = torch.rand(shape, generator=gen(50 + seed)) < 0.6
        act_rows = rows_view(active, unit_dim)
        per_group = act_rows.reshape(-1, 4).sum(1)
        counts = torch.div(per_group + 1, 2, rounding_mode="floor").view(rows, row_len // 4)
        mask = select_per_group(scores, 4, counts, gen(3), among=active, unit_dim=unit_dim)
        assert torch.equal(group_counts(mask, 4, unit_dim), counts)
        assert not (mask & ~active).any()
        expected = reference(values.reshape(-1, 4), act_rows.reshape(-1, 4), counts.reshape(-1).tolist(), gen(3))
        assert torch.equal(rows_view(mask, unit_dim).reshape(-1, 4), expected)

        free = (~act_rows).sum(1)
        counts = torch.div(free, 3, rounding_mode="floor")
        mask = select_per_row(scores, counts, gen(4), among=active, outside=True, unit_dim=unit_dim)
        assert torch.equal(row_counts(mask, unit_dim), counts)
        assert not (mask & active).any()
        assert torch.equal(rows_view(mask, unit_dim), reference(values, ~act_rows, counts.tolist(), gen(4)))


def test_negative_and_infinite_scores_among_a_subset():
    """Non-competing entries never win, whatever the competitors score (negative, -inf)."""
    scores = torch.tensor([[-float("inf"), 1.0, -float("inf"), 5.0, -2.0, -3.0, 0.0, 0.0]])
    among = torch.tensor([[True, False, True, True, True, True, False, False]])
    for seed in range(5):
        mask = select_per_group(scores, 4, 2, gen(seed), among=among)
        assert not (mask & ~among).any()
        assert bool(mask[0, 3]) and mask[0, :4].sum() == 2  # 5 and one of the two competing -inf
        assert mask[0, 4:].int().tolist() == [1, 1, 0, 0]  # -2 and -3, not the zeros outside among
        assert torch.equal(mask, reference(scores.view(2, 4), among.view(2, 4), [2, 2], gen(seed)).view(1, 8))
    wide = torch.randn(6, 16, generator=gen(3)).round()  # negative values and ties
    among = torch.rand(6, 16, generator=gen(4)) < 0.5
    counts = (rows_view(among, 0).sum(1) // 2)
    assert torch.equal(select_per_row(wide, counts, gen(5), among=among),
                       reference(wide, among, counts.tolist(), gen(5)))


def test_rows_keeping_nothing_take_no_part_in_the_tie_list():
    """A row with count 0 keeps nothing and adds no tie to the permutation (as select_top_plain with k = 0)."""
    scores = torch.zeros(4, 8)
    counts = torch.tensor([0, 3, 0, 5])
    for seed in range(4):
        mask = select_per_row(scores, counts, gen(seed))
        assert row_counts(mask).tolist() == [0, 3, 0, 5]
        assert torch.equal(mask, reference(scores, torch.ones(4, 8, dtype=torch.bool), counts.tolist(), gen(seed)))
        # the same as the two contested rows alone: their 16 ties, one permutation of 16
        assert torch.equal(mask[[1, 3]], select_per_row(scores[[1, 3]], counts[[1, 3]], gen(seed)))


def test_in_by_out_layout_equals_the_transposed_weight():
    """unit_dim=1 (Conv1D's in × out) selects exactly what unit_dim=0 selects on the transpose."""
    scores = tied_scores((16, 12), 3)  # in=16, out=12
    a = keep_top_per_group(scores, 4, 2, gen(9), unit_dim=1)
    b = keep_top_per_group(scores.t().contiguous(), 4, 2, gen(9))
    assert torch.equal(a, b.t())
    assert torch.equal(keep_top_per_row(scores, 3, gen(2), unit_dim=1), keep_top_per_row(scores.t(), 3, gen(2)).t())


def test_determinism_and_seeds_matter_only_where_ties_exist():
    distinct = torch.randperm(8 * 16, generator=gen(0)).float().view(8, 16)
    masks = [keep_top_per_group(distinct, 4, 2, gen(s)) for s in range(5)]
    assert all(torch.equal(masks[0], m) for m in masks)  # no ties: the generator is irrelevant
    assert torch.equal(masks[0], keep_top_per_group(distinct, 4, 2))
    g = gen(11)
    keep_top_per_row(distinct, 5, g)
    assert torch.equal(torch.randperm(30, generator=g), torch.randperm(30, generator=gen(11)))  # never drawn

    equal = torch.zeros(8, 16)
    assert torch.equal(keep_top_per_group(equal, 4, 2, gen(1)), keep_top_per_group(equal, 4, 2, gen(1)))
    by_seed = {tuple(keep_top_per_group(equal, 4, 2, gen(s)).view(-1).tolist()) for s in range(5)}
    assert len(by_seed) == 5  # all-equal scores: each seed its own choice (all exact 2:4)
    lowest = keep_top_per_group(equal, 4, 2)
    assert lowest.view(-1, 4).tolist() == [[True, True, False, False]] * 32  # no generator: lowest indices


def test_ties_do_not_cross_group_boundaries():
    """Ties only compete inside their own group: a group's above-threshold entries are always kept."""
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0]])
    for s in range(10):
        mask = keep_top_per_group(scores, 4, 2, gen(s))
        assert group_counts(mask, 4).tolist() == [[2, 2]]
        assert bool(mask[0, 4])


def test_sharded_rows_equal_one_process():
    """Blocks of rows (FSDP2 shards of a unit_dim-0 weight) with the tie span equal the whole selection."""
    scores = tied_scores((10, 16), 5, levels=2)
    active = torch.rand(10, 16, generator=gen(6)) < 0.5
    for structure, count in ((NM, 2), (FAN_IN, 6)):
        whole = select_structured(scores, structure, count, gen(8))
        cuts = [(0, 3), (3, 3), (3, 7), (7, 10)]  # an empty block included
        ties = [contested_ties(scores[a:b], structure, count) for a, b in cuts]
        assert sum(ties) == contested_ties(scores, structure, count) > 0
        parts = [select_structured(scores[a:b], structure, count, gen(8), tie_offset=sum(ties[:i]),
                                   tie_total=sum(ties)) for i, (a, b) in enumerate(cuts)]
        assert torch.equal(torch.cat(parts), whole)
    # among a mask (a pruning step), counts per group
    counts = group_counts(active, 4).clamp(max=1)
    whole = select_per_group(scores, 4, counts, gen(2), among=active)
    ties = [contested_ties(scores[a:b], NM, counts[a:b], among=active[a:b]) for a, b in ((0, 4), (4, 10))]
    parts = [select_per_group(scores[a:b], 4, counts[a:b], gen(2), among=active[a:b], tie_offset=off,
                              tie_total=sum(ties)) for (a, b), off in (((0, 4), 0), ((4, 10), ties[0]))]
    assert torch.equal(torch.cat(parts), whole)


def test_selection_errors():
    scores = torch.rand(4, 8, generator=gen(0))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :2] = True
    with pytest.raises(ValueError, match=r"^group 0 cannot keep 3 of its 2 competing entries$"):
        select_per_group(scores, 4, 3, among=mask)
    with pytest.raises(ValueError, match=r"^row 0 cannot keep 9 of its 8 competing entries$"):
        keep_top_per_row(scores, 9)
    with pytest.raises(ValueError, match=r"^row 0 cannot keep -1 of its 8 competing entries$"):
        keep_top_per_row(scores, -1)
    with pytest.raises(ValueError, match=r"has rows of 8 entries, not a multiple of the group size 3$"):
        keep_top_per_group(scores, 3, 1)
    with pytest.raises(ValueError, match=r"^group counts must be a number or a tensor of shape \(4, 2\), got shape"):
        select_per_group(scores, 4, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^row counts must be integers, got a torch.float32 tensor$"):
        select_per_row(scores, torch.ones(4))
    with pytest.raises(ValueError, match=r"^scores of shape \(4, 8\) contain NaN"):
        keep_top_per_row(torch.full((4, 8), float("nan")), 2)
    with pytest.raises(ValueError, match=r"^outside=True needs the mask it refers to: pass among$"):
        select_per_row(scores, 1, outside=True)
    with pytest.raises(ValueError, match=r"^among must be a torch.bool mask shaped like the scores \(4, 8\)"):
        select_per_row(scores, 1, among=mask.float())
    with pytest.raises(ValueError, match=r"^scores must be a floating-point tensor, got torch.int64$"):
        keep_top_per_row(torch.ones(4, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"^group size m must be a positive integer, got 0$"):
        keep_top_per_group(scores, 0, 0)
    with pytest.raises(ValueError, match=r"^an unstructured layer has no per-group or per-row selection"):
        select_structured(scores, UNSTRUCTURED, 2)
    with pytest.raises(ValueError, match=r"^tie_offset 3 with 0 contested ties here does not fit in tie_total 2$"):
        select_per_row(scores, 2, tie_offset=3, tie_total=2)


# ------------------------------------------------------------------------------------------------ the update

@pytest.mark.parametrize("shape, unit_dim", SHAPES)
@pytest.mark.parametrize("structure", [NM, FAN_IN], ids=str)
def test_prune_drop_and_regrow_keep_the_structure(shape, unit_dim, structure):
    """A gradual pruning step (4 -> 3 -> 2 per group, or a lower fan-in), then drop and regrow with all-equal
    grow scores (zero gradients), many equal scores and distinct ones: every group or row holds its count,
    the drop removes exactly n_drop, regrowth fills exactly each group's room, and nothing else changes."""
    rows, row_len = row_shape(shape, unit_dim)
    mask = torch.ones(shape, dtype=torch.bool)
    steps = (3, 2) if structure is NM else (row_len * 3 // 4, row_len // 2)
    for step, count in enumerate(steps):
        pruned = select_structured(tied_scores(shape, step), structure, count, gen(step), among=mask,
                                   unit_dim=unit_dim)
        assert not (pruned & ~mask).any()
        assert is_structured(pruned, structure, unit_dim, count)
        mask = pruned
    final = steps[-1]
    assert is_structured(mask, structure, unit_dim) and int(mask.sum()) == final * (
        rows * row_len // 4 if structure is NM else rows)
    for seed, grow in enumerate((torch.zeros(shape), tied_scores(shape, 9), torch.rand(shape, generator=gen(9)))):
        active = int(mask.sum())
        n_drop = int(0.3 * active)
        drop_scores = tied_scores(shape, 20 + seed).abs()
        kept, grown = drop_and_regrow(drop_scores, grow, mask, structure, n_drop, gen(1), gen(2), unit_dim=unit_dim)
        assert int(kept.sum()) == active - n_drop and not (kept & ~mask).any()
        assert int(grown.sum()) == n_drop and not (grown & kept).any()
        gap = room(mask, kept, structure, unit_dim)
        assert torch.equal(active_counts(grown, structure, unit_dim), gap)  # never more than a group's room
        new = kept | grown
        assert is_structured(new, structure, unit_dim, final)
        assert torch.equal(active_counts(new, structure, unit_dim), active_counts(mask, structure, unit_dim))
        again = drop_and_regrow(drop_scores, grow, mask, structure, n_drop, gen(1), gen(2), unit_dim=unit_dim)
        assert torch.equal(again[0], kept) and torch.equal(again[1], grown)  # deterministic
        mask = new


def test_drop_and_regrow_worked_example_and_errors():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    drop = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.5, 0.3, 0.0]])
    grow = torch.tensor([[0.0, 0.0, 0.7, 0.2, 0.6, 0.0, 0.0, 0.9]])
    kept, grown = drop_and_regrow(drop, grow, mask, NM, 2)
    assert kept.int().tolist() == [[1, 0, 0, 0, 0, 1, 0, 0]]  # 0.1 and 0.3 dropped
    # group 0 regrows 1 (0.7 beats 0.2 and the just-dropped 0.0); group 1 regrows 1 (0.9)
    assert grown.int().tolist() == [[0, 0, 1, 0, 0, 0, 0, 1]]
    # the drop is the library's unstructured definition, ties broken by the drop generator; the regrowth
    # is the per-group selection outside the kept mask, by the grow generator
    big = random_structured_mask((16, 32), NM, 2, gen(0))
    flat = torch.ones(16, 32)
    for seed in range(3):
        big_kept, big_grown = drop_and_regrow(flat, flat, big, NM, 50, gen(seed), gen(seed + 10))
        assert torch.equal(big_kept, select_top_plain(torch.where(big, flat, -1.0), 256 - 50, gen(seed)))
        assert torch.equal(big_grown, select_per_group(flat, 4, room(big, big_kept, NM), gen(seed + 10),
                                                       among=big_kept, outside=True))
    with pytest.raises(ValueError, match=r"^n_drop must be an integer in \[0, 4\] \(the active entries\), got 5$"):
        drop_and_regrow(drop, grow, mask, NM, 5)
    with pytest.raises(ValueError, match=r"^room: the mask after the drop holds more active entries"):
        room(kept, mask, NM)


# ------------------------------------------------------------------------------------------------ schedule

def test_nm_count_table():
    densities = [1.0, 0.95, 0.9, 0.875, 0.8, 0.75, 0.7, 0.625, 0.6, 0.5, 0.3, 0.01]
    assert [nm_count(d, 2, 4) for d in densities] == [4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2]
    assert [nm_count(d, 1, 4) for d in densities] == [4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1]
    assert [nm_count(d, 2, 8) for d in (1.0, 0.9, 0.5, 0.4375, 0.3, 0.25, 0.1)] == [8, 7, 4, 4, 2, 2, 2]
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"^density must be a number in \(0, 1\], got "):
            nm_count(bad, 2, 4)
    with pytest.raises(ValueError, match=r"^an N:M structure needs whole numbers 1 <= N < M, got N=4, M=4$"):
        nm_count(0.5, 4, 4)


def test_cubic_schedule_onto_two_four():
    """GraNet's cubic schedule from dense (d = 1) to 2:4 over 100 steps, every 10: the per-group counts."""
    schedule = PruningSchedule(init_density=1.0, final_density=0.5, start=0, end=100, interval=10)
    counts = [nm_count(schedule.density(t), 2, 4) for t in range(0, 101, 10)]
    # d(10) = 0.5 + 0.5 * 0.9**3 = 0.8645 -> 3.458 -> 3; d(30) = 0.6715 -> 2.686 -> 3; d(40) = 0.608 -> 2.432 -> 2
    assert counts == [4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert schedule.density(100) == 0.5 and nm_count(schedule.density(100), 2, 4) == 2
    sparse_start = PruningSchedule(init_density=0.5, final_density=0.25, start=0, end=100, interval=10)
    assert [nm_count(sparse_start.density(t), 1, 4) for t in range(0, 101, 20)] == [2, 2, 1, 1, 1, 1]


def test_fan_in_count_table():
    assert [fan_in_count(d, 36) for d in (1.0, 0.5, 0.1, 0.05, 0.01)] == [36, 18, 4, 2, 1]
    assert [fan_in_count(d, 10) for d in (0.25, 0.35, 0.05, 0.04)] == [2, 4, 1, 1]  # halves to even; at least 1
    assert fan_in_count(0.3, 1) == 1
    with pytest.raises(ValueError, match=r"^row_len must be a positive integer, got 0$"):
        fan_in_count(0.5, 0)
    with pytest.raises(ValueError, match=r"^density must be a number in \(0, 1\], got 0$"):
        fan_in_count(0, 10)


# ------------------------------------------------------------------------------------------------ init and checks

@pytest.mark.parametrize("shape, unit_dim", SHAPES)
def test_random_structured_masks(shape, unit_dim):
    rows, row_len = row_shape(shape, unit_dim)
    for structure, count in ((NM, 2), (Structure("n:m", 3, 4), 3), (FAN_IN, row_len // 3)):
        mask = random_structured_mask(shape, structure, count, gen(4), unit_dim=unit_dim)
        assert mask.dtype == torch.bool and tuple(mask.shape) == tuple(shape)
        assert is_structured(mask, structure, unit_dim, count)
        assert torch.equal(mask, random_structured_mask(shape, structure, count, gen(4), unit_dim=unit_dim))
        assert not torch.equal(mask, random_structured_mask(shape, structure, count, gen(5), unit_dim=unit_dim))
    with pytest.raises(ValueError, match=r"^group 0 cannot keep 5 of its 4 competing entries$"):
        random_structured_mask(shape, NM, 5, gen(0), unit_dim=unit_dim)


def test_structure_violations_name_the_first_offender():
    mask = keep_top_per_group(torch.rand(4, 8, generator=gen(0)), 4, 2)
    assert structure_violations(mask, NM) is None and is_structured(mask, NM)
    assert structure_violations(mask, UNSTRUCTURED) is None
    broken = mask.clone()
    broken[2, 4:] = True  # row 2, group 1: 4 actives
    broken[3, :4] = False  # row 3, group 0: none
    found = structure_violations(broken, NM)
    assert found == Violation(row=2, group=1, found=4, expected=2, offending=2)
    assert str(found) == "row 2 group 1 holds 4 active entries, expected 2 (2 groups in all)"
    assert not is_structured(broken, NM)
    assert structure_violations(mask, NM, count=3) == Violation(0, 0, 2, 3, 8)

    rows = keep_top_per_row(torch.rand(5, 6, generator=gen(1)), 3)
    assert is_structured(rows, FAN_IN) and is_structured(rows, FAN_IN, count=3)
    assert not is_structured(rows, FAN_IN, count=2)
    rows[4, :] = True
    assert str(structure_violations(rows, FAN_IN)) == "row 4 holds 6 active entries, expected 3 (1 row in all)"
    with pytest.raises(ValueError, match=r"does not fit a mask of shape \(4, 6\)"):
        is_structured(torch.ones(4, 6, dtype=torch.bool), NM)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selects_what_the_cpu_selects():
    """The same masks for scores on a CUDA device (ties broken by the same CPU generator)."""
    for shape, unit_dim in SHAPES:
        scores = tied_scores(shape, 1)
        active = random_structured_mask(shape, NM, 2, gen(2), unit_dim=unit_dim)
        for structure, count in ((NM, 2), (FAN_IN, 3)):
            cpu = select_structured(scores, structure, count, gen(3), unit_dim=unit_dim)
            gpu = select_structured(scores.cuda(), structure, count, gen(3), unit_dim=unit_dim)
            assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
        cpu = drop_and_regrow(scores, torch.zeros(shape), active, NM, 5, gen(4), gen(5), unit_dim=unit_dim)
        gpu = drop_and_regrow(scores.cuda(), torch.zeros(shape, device="cuda"), active.cuda(), NM, 5, gen(4), gen(5),
                              unit_dim=unit_dim)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
        mask = random_structured_mask(shape, NM, 2, gen(6), unit_dim=unit_dim, device=torch.device("cuda"))
        assert mask.is_cuda and torch.equal(mask.cpu(), random_structured_mask(shape, NM, 2, gen(6), unit_dim=unit_dim))
