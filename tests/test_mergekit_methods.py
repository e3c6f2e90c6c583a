"""arcee_fusion, sce, karcher, multislerp, nearswap, ram, ramplus_tl against in-memory references written here from
mergekit 0.1.5's definitions (whole tensors, plain torch, float64 where the method sums over a tensor), plus edge
cases and mergekit configs. Chunk invariance is tested with the other methods in test_methods.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from merge_helpers import run_merge
from test_methods import close, dyadic
from streammerge.errors import ConfigError, PlanError, StreamMergeError


def make_models(n_models=3, shape=(96, 130), seed=0, scale=0.003, dyadic_data=False):
    """A base plus fine-tunes that share a direction (as real fine-tunes do), with a 1-D tensor too."""
    g = torch.Generator().manual_seed(seed)
    if dyadic_data:
        base = {"w": dyadic(shape, g), "b": dyadic((shape[-1],), g)}
        return base, [{k: v + dyadic(v.shape, g, spread=3) for k, v in base.items()} for _ in range(n_models)]
    base = {"w": torch.randn(shape, generator=g) * 0.02, "b": 1 + torch.randn(shape[-1], generator=g) * 0.02}
    shared = {k: torch.randn(v.shape, generator=g) * scale for k, v in base.items()}
    return base, [{k: v + shared[k] + torch.randn(v.shape, generator=g) * scale for k, v in base.items()}
                  for _ in range(n_models)]


# -- references ----------------------------------------------------------------------------------------------
def ref_nearswap(t, base, x):
    weight = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * x + (1 - weight) * base


def ref_ram(base, xs, epsilon, r=None, alpha=None):
    deltas = torch.stack([(x - base).double() for x in xs])
    changed = deltas.abs() > epsilon
    count = changed.sum(0)
    kept = deltas * changed
    if r is None:
        return base.double() + kept.sum(0) / count.clamp(min=1)
    unique, shared = count == 1, count > 1
    scales = []
    for i in range(len(xs)):
        rho = (changed[i] & shared).sum().item() / max((changed[i] & unique).sum().item(), epsilon)
        scales.append(1 + r * min(max(rho, 0.0), alpha))
    scale = torch.tensor(scales, dtype=torch.float64).view(-1, *[1] * base.dim())
    return base.double() + (kept * unique * scale).sum(0) + (kept * shared).sum(0) / count.clamp(min=1)


def ref_sce(base, xs, select_topk):
    deltas = torch.stack([x - base for x in xs])
    if select_topk <= 0:
        return base.double()
    if select_topk < 1:
        variance = torch.var(deltas, dim=0, unbiased=False).flatten()
        k = int(int(variance.count_nonzero()) * select_topk)
        order = torch.sort(variance, stable=True).indices  # ascending (variance, position)
        keep = torch.zeros(variance.numel(), dtype=torch.bool)
        keep[order[variance.numel() - k:]] = True
        deltas = deltas * keep.view(base.shape)
    deltas = deltas.double()
    means = deltas.square().flatten(1).mean(1)
    weights = means / means.sum() if abs(means.sum().item()) >= 1e-6 else torch.full_like(means, 1 / len(xs))
    weights = weights.view(-1, *[1] * base.dim())
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(deltas) == majority).double()
    return base.double() + (deltas * weights * agree).sum(0) / (weights * agree).sum(0).clamp(min=1e-6)


def ref_fusion_importance(base, x):
    x64, b64 = x.double(), base.double()
    p = torch.softmax(x64, dim=-1) + 1e-8
    q = torch.softmax(b64, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True).clamp(min=0)
    return (x - base).abs() * kl.float()


def ref_arcee_fusion(base, x):
    importance = ref_fusion_importance(base, x)
    ordered = importance.flatten().sort().values
    n = ordered.numel()
    q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    return base + (x - base) * (importance >= median + 1.5 * (q3 - q1))


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit's iteration on the full vectors, in float64."""
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().flatten() for x in xs]
    norms = [v.norm().item() for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    units = [vs[i] / norms[i] for i in valid]
    alpha = 1 / len(valid)
    mean = sum(alpha * u for u in units)
    mean = units[0].clone() if mean.norm().item() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(dot).item()
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (u - dot * mean)
        tangent_norm = tangent.norm().item()
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        if mean.norm().item() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(xs) * mean).view(xs[0].shape)


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    """mergekit's definition on the full vectors, in float64."""
    if len(xs) == 1:
        return xs[0].double()
    vs = torch.stack([(x - base if base is not None else x).double().flatten() for x in xs])
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = vs.norm(dim=-1, keepdim=True)
    units = vs / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = tangent.norm() + eps
    result = (mean * torch.cos(tangent_norm) + tangent * torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(xs[0].shape)
    return result + base.double() if base is not None else result


# -- the methods against the references ----------------------------------------------------------------------
def test_nearswap_matches_reference_bit_for_bit(tmp_path):
    base, models = make_models(1)
    for t in (0.0, 0.002, 0.01, 1.0):
        out = run_merge(tmp_path / str(t), "nearswap", models, base, parameters={"t": t})
        for name in base:
            assert torch.equal(out[name], ref_nearswap(t, base[name], models[0][name])), (t, name)
    assert torch.equal(out["w"], models[0]["w"])  # t = 1 is far above every difference: the model itself


def test_nearswap_needs_t(tmp_path):
    base, models = make_models(1)
    with pytest.raises(PlanError, match="nearswap needs `t`"):
        run_merge(tmp_path, "nearswap", models, base)


@pytest.mark.parametrize("epsilon", [1e-5, 0.004])
def test_ram_matches_reference(tmp_path, epsilon):
    base, models = make_models(3)
    models[0]["w"][:30] = base["w"][:30]  # entries models leave unchanged: shared by fewer models, or none
    models[1]["w"][20:40] = base["w"][20:40]
    models[2]["w"][25:35] = base["w"][25:35]
    out = run_merge(tmp_path, "ram", models, base, parameters={"epsilon": epsilon})
    for name in base:
        close(out[name], ref_ram(base[name], [m[name] for m in models], epsilon), rtol=1e-6, atol=1e-7)
    assert torch.equal(out["w"][25:30], base["w"][25:30])  # no model changed them


def test_ramplus_tl_matches_reference(tmp_path):
    base, models = make_models(3)
    models[0]["w"][:30] = base["w"][:30]
    models[1]["w"][20:60] = base["w"][20:60]
    models[2]["w"][10:90:2] = base["w"][10:90:2]
    for r, alpha, epsilon in ((0.1, 0.2, 1e-5), (0.7, 5.0, 1e-3)):
        params = {"r": r, "alpha": alpha, "epsilon": epsilon}
        out = run_merge(tmp_path / str(r), "ramplus_tl", models, base, parameters=params)
        for name in base:
            close(out[name], ref_ram(base[name], [m[name] for m in models], epsilon, r, alpha), rtol=1e-6, atol=1e-7)
    plain = run_merge(tmp_path / "ram", "ram", models, base)
    assert not torch.equal(out["w"], plain["w"])  # the unique entries were rescaled


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_compares_with_epsilon_rounded_to_the_dtype(tmp_path, method):
    """torch compares float32 deltas with a Python float rounded to float32: a delta of float32(0.1), above 0.1 in
    float64, is no change (mergekit's rule), so the entry stays at the base; one a step above it is one."""
    at = torch.tensor(0.1, dtype=torch.float32)
    above = torch.nextafter(at, torch.tensor(1.0))
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.stack([at, above, at, torch.tensor(0.0)])}]
    out = run_merge(tmp_path, method, models, base, parameters={"epsilon": 0.1})
    assert out["w"].tolist() == [0.0, above.item(), 0.0, 0.0]  # (ramplus_tl: no entry shared, a scale of 1)


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
def test_sce_matches_reference(tmp_path, select_topk):
    base, models = make_models(3, dyadic_data=True)  # dyadic: many equal variances at the threshold
    out = run_merge(tmp_path, "sce", models, base, parameters={"select_topk": select_topk})
    for name in base:
        close(out[name], ref_sce(base[name], [m[name] for m in models], select_topk), rtol=1e-6, atol=1e-6)
        if select_topk == 0.0:
            assert torch.equal(out[name], base[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_sce_variance_is_torch_var_bit_for_bit(dtype, count, monkeypatch):
    """The compiled variance has the bits of torch.var in float32 (mergekit's) and of the same sums over the whole
    tensor in float64 (torch.var's Welford steps round differently there), split between threads with a ragged
    tail (the threads' least share made small), with Inf and NaN inputs (their NaN made positive, as the selection
    ranks it)."""
    from types import SimpleNamespace

    from streammerge.methods import sce
    from streammerge.methods.streaming import KERNEL_GRAIN

    monkeypatch.setattr(sce, "SCE_GRAIN", KERNEL_GRAIN)
    n = 3 * KERNEL_GRAIN + 1001
    g = torch.Generator().manual_seed(count)
    base = torch.randn(n, generator=g, dtype=dtype)
    inputs = [base + torch.randn(n, generator=g, dtype=dtype) * 10.0 ** -i for i in range(count)]
    inputs[0][[5, 7, n - 1]] = torch.tensor([math.inf, math.nan, -math.inf], dtype=dtype)
    inputs[-1][[5, 9]] = math.inf
    out = sce.variance(SimpleNamespace(inputs=inputs, base=base), torch.empty(n, dtype=dtype))
    deltas = torch.stack([x - base for x in inputs])
    if dtype == torch.float32:
        expected = torch.var(deltas, dim=0, unbiased=False).abs()
    else:
        expected = (deltas - deltas.sum(0) / count).square().sum(0).div(count).abs()
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(out.view(bits), expected.view(bits))


def test_sce_on_random_floats_and_a_single_model(tmp_path):
    base, models = make_models(3, seed=4)
    out = run_merge(tmp_path / "r", "sce", models, base, parameters={"select_topk": 0.5})
    for name in base:
        close(out[name], ref_sce(base[name], [m[name] for m in models], 0.5), rtol=1e-6, atol=1e-7)
    out = run_merge(tmp_path / "one", "sce", models[:1], base)  # one model: its own task vector, weight 1
    for name in base:
        close(out[name], models[0][name], rtol=1e-6, atol=1e-7)


def test_arcee_fusion_matches_reference(tmp_path):
    base, models = make_models(1, shape=(200, 333), seed=2)
    models[0]["w"][:40] += torch.randn(40, 333, generator=torch.Generator().manual_seed(3)) * 0.05  # rows of large KL
    out = run_merge(tmp_path, "arcee_fusion", models, base)
    for name in base:
        expected = ref_arcee_fusion(base[name], models[0][name])
        assert torch.equal(out[name], expected), name
        taken = out[name] != base[name]
        assert 0 < taken.float().mean() < 0.5, name  # a minority of entries: the upper outliers
    assert (out["w"][:40] != base["w"][:40]).float().mean() > (out["w"][40:] != base["w"][40:]).float().mean()


def test_arcee_fusion_in_float64_streamed_and_in_memory(tmp_path):
    """Accumulating in float64, a chunk of float64 values is the input itself: the KL terms are computed on copies
    (in place they turned the inputs into probabilities, which the importances and the merge then read)."""
    from test_methods import GRID
    g = torch.Generator().manual_seed(6)
    # a convolution's rows of 7, reduced a column at a time, straddle the grid blocks
    base = {"w": torch.randn(192, 1024, generator=g), "odd": torch.randn(300, 333, generator=g),
            "conv": torch.randn(200, 64, 7, generator=g)}
    models = [{n: v + 0.003 * torch.randn(v.shape, generator=g) for n, v in base.items()}]
    for v in models[0].values():
        v[:30] += 0.05 * torch.randn(30, *v.shape[1:], generator=g)  # rows of large KL
    in_memory = run_merge(tmp_path / "memory", "arcee_fusion", models, base, dtype="float64")
    streamed = run_merge(tmp_path / "streamed", "arcee_fusion", models, base, dtype="float64", chunk=GRID,
                         engine_options={"stats_in_memory": False})
    for name, b in base.items():
        assert torch.equal(in_memory[name], streamed[name]), name
        x64, b64 = models[0][name].double(), b.double()
        p, q = torch.softmax(x64, dim=-1) + 1e-8, torch.softmax(b64, dim=-1) + 1e-8
        importance = (x64 - b64).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True).clamp(min=0)
        ordered = importance.flatten().sort().values
        n = ordered.numel()
        q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
        expected = (b64 + (x64 - b64) * (importance >= median + 1.5 * (q3 - q1))).float()
        assert int((streamed[name] != expected).sum()) <= 2, name  # (KL sums in another order: a border entry)
        assert 0 < (streamed[name] != b).float().mean() < 0.5, name


def test_arcee_fusion_of_one_element_rows_keeps_no_row_statistics(tmp_path, monkeypatch):
    """Rows of one element (a [out, in, 1] convolution kernel) have KL 0, so their merge keeps no per-row
    statistics (for a real kernel of 3 million rows they would hold about 130 MiB): the result has the bits of the
    full computation, in memory and streamed, with infinite and NaN inputs, and matches the reference."""
    from streammerge.methods import arcee_fusion
    from test_methods import GRID

    g = torch.Generator().manual_seed(8)
    base = {"conv": torch.randn(300, 700, 1, generator=g), "plain": torch.randn(40, 333, generator=g)}
    model = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()}
    finite = run_merge(tmp_path / "finite", "arcee_fusion", [model], base)
    for name in base:
        assert torch.equal(finite[name], ref_arcee_fusion(base[name], model[name])), name
    assert torch.equal(finite["conv"], model["conv"])  # every importance is 0, as is the threshold: all taken
    model["conv"][0, :3, 0] = torch.tensor([math.inf, -math.inf, math.nan])

    def both_ways(statistics: str) -> list[dict]:
        return [run_merge(tmp_path / f"{statistics}-{chunk}", "arcee_fusion", [model], base, chunk=chunk,
                          engine_options={"stats_in_memory": chunk is None, "allow_nonfinite": True})
                for chunk in (None, GRID)]

    runs = {}
    monkeypatch.setattr(arcee_fusion, "one_element_rows", lambda shape: False)  # the computation of longer rows
    runs["kept"] = both_ways("kept")
    monkeypatch.undo()
    made = []
    monkeypatch.setattr(arcee_fusion, "RowLogSumExp",
                        lambda groups, real=arcee_fusion.RowLogSumExp: made.append(groups.count) or real(groups))
    runs["skipped"] = both_ways("skipped")
    assert made and 300 * 700 not in made  # (the other tensor's 40 rows do keep theirs)
    for name in base:
        reference = runs["kept"][0][name]
        for out in runs["kept"][1:] + runs["skipped"]:
            assert torch.equal(out[name].view(torch.int32), reference.view(torch.int32)), name


def test_arcee_fusion_of_one_element_rows_streamed_reads_them_twice(tmp_path, monkeypatch):
    """A streamed tensor of one-element rows, too large for its importances to be gathered in the buffers (5
    chunks), has importances all 0: the first histogram pass finds every quartile among the zeros, so its chunks
    are read twice (that pass and the merge) where the radix passes read them three times; the model's values are
    all taken, as the reference takes them."""
    from streammerge.engine import Engine
    from test_methods import GRID

    g = torch.Generator().manual_seed(10)
    base = {"conv": torch.randn(600, 1000, 1, generator=g)}
    model = {"conv": base["conv"] + 0.01 * torch.randn(600, 1000, 1, generator=g)}
    reads = []
    original = Engine._context
    monkeypatch.setattr(Engine, "_context", lambda self, task, ws, s, e: reads.append(e - s) or original(
        self, task, ws, s, e))
    out = run_merge(tmp_path, "arcee_fusion", [model], base, chunk=GRID, engine_options={"stats_in_memory": False})
    assert sum(reads) == 2 * 600 * 1000
    assert torch.equal(out["conv"], ref_arcee_fusion(base["conv"], model["conv"]))
    assert torch.equal(out["conv"], model["conv"])


def test_arcee_fusion_of_an_unchanged_model_is_the_base(tmp_path):
    base, _ = make_models(1)
    out = run_merge(tmp_path, "arcee_fusion", [dict(base)], base)
    for name in base:
        assert torch.equal(out[name], base[name])


def test_karcher_matches_reference(tmp_path):
    _, models = make_models(3, seed=5, scale=0.01)
    out = run_merge(tmp_path, "karcher", models)
    for name in models[0]:
        close(out[name], ref_karcher([m[name] for m in models]), rtol=1e-5, atol=1e-7)
    # far-apart directions take several iterations; max_iter and tol are honoured
    g = torch.Generator().manual_seed(6)
    spread = [{"v": torch.randn(5000, generator=g) + 0.5} for _ in range(4)]
    for max_iter, tol in ((10, 1e-5), (1, 1e-5), (0, 1e-5), (10, 0.5)):
        out = run_merge(tmp_path / f"{max_iter}-{tol}", "karcher", spread,
                        parameters={"max_iter": max_iter, "tol": tol})
        close(out["v"], ref_karcher([m["v"] for m in spread], max_iter, tol), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_sphere_coefficients_from_the_gram_matrix_equal_the_iteration_on_the_vectors(n_models):
    """karcher's and multislerp's coefficients, computed on Python floats from the float64 Gram matrix, applied
    to the float64 vectors, give mergekit's iteration on the whole vectors to float64 precision."""
    from streammerge.methods.gram import mat_vec
    from streammerge.methods.karcher import karcher_coefficients
    from streammerge.methods.multislerp import multislerp_coefficients

    g = torch.Generator().manual_seed(n_models)
    vs = [torch.randn(700, generator=g, dtype=torch.float64) + 0.3 for _ in range(n_models)]
    gram = [[float(a @ b) for b in vs] for a in vs]
    assert mat_vec(gram, [1.0] * n_models) == pytest.approx([float(sum(row)) for row in gram], rel=1e-15)
    for max_iter, tol in ((10, 1e-5), (3, 1e-5), (10, 0.3)):
        coefficients = karcher_coefficients(gram, max_iter, tol)
        got = sum(c * v for c, v in zip(coefficients, vs))
        torch.testing.assert_close(got, ref_karcher(vs, max_iter, tol), rtol=1e-10, atol=1e-12)
    weights = [0.5, 0.3, 0.2, 0.7, 0.1][:n_models]
    for normalize in (True, False):
        coefficients = multislerp_coefficients(gram, weights, normalize, 1e-8)
        got = sum(c * v for c, v in zip(coefficients, vs))
        torch.testing.assert_close(got, ref_multislerp(vs, weights, normalize=normalize), rtol=1e-10, atol=1e-12)


def test_small_algebra_keeps_ieee_results_where_python_would_raise():
    """A zero divisor gives a tensor division's inf or NaN (no ZeroDivisionError), clamps keep NaN: identical
    directions with tol 0 give NaN coefficients (as mergekit's 0 / sin(0) does), not an exception."""
    from streammerge.methods.gram import clamp, divide, root_of_clamped
    from streammerge.methods.karcher import karcher_coefficients

    specials = [0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan]
    for a in specials:
        for b in specials:
            expected = (torch.tensor(a, dtype=torch.float64) / torch.tensor(b, dtype=torch.float64)).item()
            got = divide(a, b)
            assert (math.isnan(got) and math.isnan(expected)) or (got == expected and
                                                                  math.copysign(1, got) == math.copysign(1, expected))
        assert repr(clamp(a, -1.0, 1.0)) == repr(torch.tensor(a, dtype=torch.float64).clamp(-1, 1).item())
    assert math.isnan(root_of_clamped(math.nan)) and root_of_clamped(-4.0) == 0.0 and root_of_clamped(4.0) == 2.0
    same = [[4.0, 4.0], [4.0, 4.0]]
    assert all(math.isnan(c) for c in karcher_coefficients(same, 10, 0.0))


def test_karcher_edge_cases(tmp_path):
    _, models = make_models(2, seed=7)
    out = run_merge(tmp_path / "one", "karcher", models[:1])
    assert all(torch.equal(out[k], models[0][k]) for k in models[0])
    out = run_merge(tmp_path / "same", "karcher", [models[0]] * 3)
    for name in models[0]:
        close(out[name], models[0][name], rtol=1e-6, atol=1e-7)
    zero = {k: torch.zeros_like(v) for k, v in models[0].items()}
    out = run_merge(tmp_path / "zero", "karcher", [models[0], zero, models[1]])  # no direction, but counts in the norm
    for name in models[0]:
        close(out[name], ref_karcher([models[0][name], zero[name], models[1][name]]), rtol=1e-5, atol=1e-7)
    out = run_merge(tmp_path / "zeros", "karcher", [zero, zero])
    assert all(torch.equal(out[k], zero[k]) for k in zero)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(tmp_path, with_base, normalize):
    base, models = make_models(3, seed=8, scale=0.01)
    weights = [0.2, 0.5, 0.3] if normalize else [0.4, 0.9, 0.3]
    out = run_merge(tmp_path, "multislerp", models, base if with_base else None, [{"weight": w} for w in weights],
                    parameters={"normalize_weights": normalize})
    for name in base:
        expected = ref_multislerp([m[name] for m in models], weights, base[name] if with_base else None, normalize)
        close(out[name], expected, rtol=1e-5, atol=1e-7)


def test_multislerp_edge_cases(tmp_path):
    base, models = make_models(2, seed=9)
    out = run_merge(tmp_path / "one", "multislerp", models[:1], base)
    assert all(torch.equal(out[k], models[0][k]) for k in base)  # one model is returned as it is
    a = {"v": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    minus_a = {"v": -a["v"]}
    out = run_merge(tmp_path / "two", "multislerp", [a, minus_a], model_params=[{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out["v"], a["v"] * 0.5 + minus_a["v"] * 0.5)  # opposite, balanced: linear
    with pytest.raises(StreamMergeError, match="weighted mean of the models' directions is zero for 'v'"):
        run_merge(tmp_path / "three", "multislerp", [a, minus_a, a, minus_a])
    with pytest.raises(PlanError, match="sum to zero"):
        run_merge(tmp_path / "zero", "multislerp", models, base, [{"weight": 1.0}, {"weight": -1.0}])


def test_parameters_are_checked(tmp_path):
    base, models = make_models(2)
    with pytest.raises(ConfigError, match="select_topk"):
        run_merge(tmp_path / "s", "sce", models, base, parameters={"select_topk": 1.5})
    with pytest.raises(ConfigError, match="exactly 1"):
        run_merge(tmp_path / "a", "arcee_fusion", models, base)
    with pytest.raises(ConfigError, match="needs a base"):
        run_merge(tmp_path / "r", "ram", models)
    with pytest.raises(ConfigError, match="does not use a base"):
        run_merge(tmp_path / "k", "karcher", models, base)


# -- mergekit configs ----------------------------------------------------------------------------------------
MERGEKIT_CASES = {
    "arcee_fusion": ({}, [{}]),
    "nearswap": ({"t": [0.001, 0.01]}, [{}]),
    "sce": ({"select_topk": 0.5}, [{}, {}]),
    "ram": ({"epsilon": 1e-4}, [{}, {}]),
    "ramplus_tl": ({"r": 0.3, "alpha": 0.5}, [{}, {}]),
    "multislerp": ({"normalize_weights": True}, [{"weight": 0.3}, {"weight": [0.2, 0.9]}]),
    "karcher": ({"max_iter": 5}, [{}, {}]),
}


@pytest.mark.parametrize("method", list(MERGEKIT_CASES))
def test_mergekit_configs_run_as_streammerge_configs(tmp_path, method, cli):
    from compare_mergekit import build_models
    from test_mergekit_config import load_dir as load
    from streammerge.mergekit_config import layer_positions

    models = build_models(tmp_path / "hf", vocab=64, hidden=16, inter=24, layers=3)
    top, per_model = MERGEKIT_CASES[method]
    names = ["a", "b"][:len(per_model)]
    config = {"merge_method": method, "dtype": "float32", "parameters": top,
              "models": [{"model": str(models[n]), "parameters": p} for n, p in zip(names, per_model)]}
    if method != "karcher":
        config["base_model"] = str(models["base"])
        config["models"].insert(0, {"model": str(models["base"])})  # mergekit configs often list the base too
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    result = cli("merge", tmp_path / "mk.yml", "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr

    got, base = load(tmp_path / "out"), load(models["base"])
    inputs = [load(models[n]) for n in names]
    positions = layer_positions(list(got))
    for name, value in got.items():
        t = positions[name]
        xs = [m[name] for m in inputs]
        if method == "arcee_fusion":
            expected = ref_arcee_fusion(base[name], xs[0])
        elif method == "nearswap":
            expected = ref_nearswap(0.001 + t * 0.009, base[name], xs[0])
        elif method == "sce":
            expected = ref_sce(base[name], xs, 0.5)
        elif method == "ram":
            expected = ref_ram(base[name], xs, 1e-4)
        elif method == "ramplus_tl":
            expected = ref_ram(base[name], xs, 1e-5, 0.3, 0.5)
        elif method == "multislerp":
            expected = ref_multislerp(xs, [0.3, 0.2 + t * 0.7], base[name])
        else:
            expected = ref_karcher(xs, max_iter=5)
        close(value, expected, rtol=1e-5, atol=1e-6)


def test_mergekit_config_warns_about_parameters_a_method_does_not_take(tmp_path):
    """mergekit ignores them, so the config runs, with a warning naming the parameter."""
    from compare_mergekit import build_models
    from streammerge.config import load_config

    models = build_models(tmp_path / "hf", vocab=64, hidden=16, inter=24, layers=3)
    config = {"merge_method": "sce", "base_model": str(models["base"]),
              "models": [{"model": str(models["a"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    merge = load_config(tmp_path / "mk.yml")
    assert any("'weight' is ignored: it is not a parameter of method 'sce'" in w for w in merge.warnings)
    assert "weight" not in merge.models[0].params


def test_arcee_fusion_row_blocks():
    """Chunks hold whole rows when rows divide the grid, or when a few grid blocks (at most the smallest chunk)
    hold whole long rows; not for rows of 7 or 1026 (7 and 513 blocks), short rows of 3, or one row."""
    from streammerge.methods.arcee_fusion import row_block
    from test_methods import GRID
    assert [row_block(shape) for shape in [(4, 1024), (2, 8, 16), (9, 3072), (5, 1536), (3, 4 * GRID)]] == [
        GRID, GRID, 3 * GRID, 3 * GRID, 4 * GRID]
    assert [row_block(shape) for shape in [(4, 7), (4, 1026), (4, 3), (4, 5 * 1024), (3072,), (0, 3072)]] == [
        None] * 6


@pytest.mark.parametrize("nonfinite", [False, True])
def test_arcee_fusion_whole_rows_kl_sums_are_the_softmax_kl_whatever_the_chunks(nonfinite):
    """The first pass over whole rows (`_whole_rows_first_pass`: each row's softmaxes and KL in one compiled pass,
    blocks on the merge's threads) gives the same float64 KL sums, bit for bit, over the whole tensor at once and
    over chunks of a few grid blocks (the merge's output, a float32 threshold on float32 importances, would hide a
    difference in the last bits of the sums), and they are torch's float64 softmax KL to 1e-12."""
    from streammerge.methods import arcee_fusion
    from streammerge.methods.streaming import Groups, GroupSums
    from test_methods import GRID
    g = torch.Generator().manual_seed(8)
    shape = (6 * GRID // 512, 512)  # six grid blocks of 128 rows
    base = torch.randn(shape, generator=g) * 3
    x = base + 0.02 * torch.randn(shape, generator=g)
    x[:40] += torch.randn(40, 512, generator=g)  # rows of large KL
    if nonfinite:
        x[3, 7], x[200, 0], base[500, 9], x[600] = math.inf, math.nan, -math.inf, -math.inf
    p = torch.softmax(x.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    reference = (p * torch.log(p / q)).sum(-1).numpy()
    x, base = x.flatten(), base.flatten()

    def stats() -> arcee_fusion.FusionStats:
        made = arcee_fusion.FusionStats(x.numel(), 1)
        made.groups = Groups("rows", shape)
        made.kl_sums = GroupSums(made.groups, 1)
        return made

    whole = stats()
    arcee_fusion._whole_rows_first_pass(whole, 0, x, base)
    chunked = stats()
    for a, z in [(0, 2 * GRID), (2 * GRID, 5 * GRID), (5 * GRID, 6 * GRID)]:
        arcee_fusion._whole_rows_first_pass(chunked, a, x[a:z], base[a:z])
    sums, other = whole.kl_sums.sums.numpy()[0], chunked.kl_sums.sums.numpy()[0]
    nan = np.isnan(sums)
    assert np.array_equal(nan, np.isnan(other)) and np.array_equal(nan, np.isnan(reference))
    assert np.array_equal(sums[~nan].view(np.uint64), other[~nan].view(np.uint64))
    assert np.abs(sums[~nan] - reference[~nan]).max() <= 1e-12 * np.abs(reference[~nan]).max()
    assert np.nanmin(sums[:40]) > 100 * np.nanmedian(sums[40:])
    # NaN where x holds +Inf, NaN or only -Inf (the base's -Inf gives q = 1e-8 there: a finite KL)
    assert list(np.flatnonzero(nan)) == ([3, 200, 600] if nonfinite else [])


@pytest.mark.parametrize("large_kl_rows", ["spread", "first"])
@pytest.mark.parametrize("rows, width, chunks, streamed_chunks", [
    (1024, 1024, (4, 2), (4, 2)),  # rows of 1024 divide the grid: 16 grid blocks, chunks of 4 or 2 blocks
    (512, 3072, (7, 4), (6, 3)),  # rows of 3072 fill three: 24 grid blocks, chunks of 7 or 4 blocks made 6 or 3
])
def test_arcee_fusion_reads_whole_rows_gathered_and_bracketed(tmp_path, monkeypatch, rows, width, chunks,
                                                              streamed_chunks, large_kl_rows):
    """Rows of 1024, or of 3072 in chunks of whole three-block row blocks, never straddle a chunk, so the first pass
    gives their log-sum-exp, KL and importances (2 passes fewer). When the tensor's importances fit the method's
    buffers, the first selection pass gathers them and selects at its end; when they do not, it brackets the
    quartiles from the first chunk's importances: 2 reads of each chunk in all (4 with the log-sum-exp and KL
    passes), where the first chunk is like the rest (rows of large KL spread over the tensor). Where it is not
    (they all lie in the first chunk), the ranges miss and the histogram passes run after it: 4 reads (6). The
    same bits on every path, in memory and as the reference. Rows the model shifts by a constant have the base's
    softmax, so a KL of 0: far from the threshold unless a row's probabilities were normalised by the other
    model's log-sum-exp."""
    from streammerge.engine import Engine
    from streammerge.methods import arcee_fusion
    from test_methods import GRID
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(rows, width, generator=g)}
    models = [{"w": base["w"] + 0.003 * torch.randn(rows, width, generator=g)}]
    large = slice(0, 100) if large_kl_rows == "first" else slice(0, rows, 5)
    models[0]["w"][large] += 0.05 * torch.randn(models[0]["w"][large].shape, generator=g)  # rows of large KL
    models[0]["w"][-10:] = base["w"][-10:] + 0.5  # (past the first chunk)
    in_memory = run_merge(tmp_path / "memory", "arcee_fusion", models, base)
    reads = []
    original = Engine._context
    monkeypatch.setattr(Engine, "_context", lambda self, task, ws, s, e: reads.append(e - s) or original(
        self, task, ws, s, e))
    runs = {}
    missed = 2 if large_kl_rows == "first" else 0  # (the bracketing pass, then a second histogram pass)
    # the first chunk: the importances fit the 5 buffers of its size; the second: they do not
    for chunk, streamed, fused, expected_reads in ((chunks[0], streamed_chunks[0], True, 2),
                                                   (chunks[0], streamed_chunks[0], False, 4),
                                                   (chunks[1], streamed_chunks[1], True, 2 + missed),
                                                   (chunks[1], streamed_chunks[1], False, 4 + missed)):
        reads.clear()
        monkeypatch.setattr(arcee_fusion, "rows_stay_in_chunks", lambda shape, fused=fused: fused)
        runs[chunk, fused] = run_merge(tmp_path / f"{chunk}-{fused}", "arcee_fusion", models, base,
                                       chunk=chunk * GRID, engine_options={"stats_in_memory": False})["w"]
        assert reads == [streamed * GRID] * (expected_reads * rows * width // (streamed * GRID)), (chunk, fused)
    fused = runs[chunks[0], True]
    for other in runs.values():
        assert torch.equal(fused, other)
    assert torch.equal(fused, in_memory["w"])
    assert torch.equal(fused, ref_arcee_fusion(base["w"], models[0]["w"]))
    assert 0 < (fused != base["w"]).float().mean() < 0.5
    assert torch.equal(fused[-10:], base["w"][-10:])
