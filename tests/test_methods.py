"""Every merge method against a small in-memory reference written here, plus edge cases and chunk invariance.

Most data are small dyadic numbers (k / 8), so sums are exact in float32 whatever their order and magnitudes
tie a lot: the references can then demand bit-identical results, tie-breaking included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge_helpers import run_merge
from streammerge.errors import ConfigError, PlanError, StreamMergeError

GRID = 64 * 1024


def dyadic(shape, generator, spread=24):
    return torch.randint(-spread, spread + 1, shape, generator=generator).float() / 8


def make_set(n_models=3, shape=(96, 130), seed=0, dyadic_data=True):
    g = torch.Generator().manual_seed(seed)
    gen = (lambda s: dyadic(s, g)) if dyadic_data else (lambda s: torch.randn(s, generator=g))
    base = {"w": gen(shape), "b": gen((shape[-1],))}
    models = [{k: v + gen(v.shape) for k, v in base.items()} for _ in range(n_models)]
    return base, models


# -- references (whole tensors, plain torch) -----------------------------------------------------------------
def ascending_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Rank of each element in the order (|delta|, position)."""
    flat = magnitudes.flatten()
    order = torch.sort(flat, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel())
    return ranks.view(magnitudes.shape)


def ref_keep(delta, kind, density, gamma=0.0):
    n = delta.numel()
    if kind is None or density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    ranks = ascending_ranks(delta.abs())
    if kind == "magnitude":
        if density <= 0:
            return torch.zeros_like(delta, dtype=torch.bool)
        return ranks >= n - max(1, int(density * n))
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    return (ranks >= bottom) & (ranks < bottom + target)


def ref_task_vectors(base, xs, weights, keeps, consensus, normalize, lam=1.0, rescale_l1=False, scales=None):
    deltas = []
    for i, (x, w, keep) in enumerate(zip(xs, weights, keeps)):
        d = x - base
        kept = d * keep
        if scales is not None:
            kept = kept / scales[i]
        if rescale_l1:
            before, after = d.abs().double().sum().item(), kept.abs().double().sum().item()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        deltas.append(kept * w)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    if consensus:
        majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stacked) == majority).float()
        mixed = (stacked * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam if lam != 1 else base + mixed


def ref_slerp(t, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm().item(), b64.norm().item()
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, (a64 @ b64).item() / (na * nb)))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).view(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).view(a.shape)


def ref_nuslerp(t, v0, v1, dim_kind):
    v0, v1 = v0.double(), v1.double()
    shape = v0.shape
    if dim_kind == "tensor" or v0.dim() < 2:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif dim_kind == "columns":
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos**2) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim_kind == "columns" and len(shape) >= 2:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def ref_model_stock(base, xs, filter_wise=False):
    shape = base.shape
    b = base.double()
    ws = [x.double() for x in xs]
    if filter_wise:
        if b.dim() == 1:
            b, ws = b.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        b, ws = b.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - b for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0, n * cos / denominator)
    return (t * (sum(ws) / n) + (1 - t) * b).reshape(shape)


def close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# -- task-vector methods -------------------------------------------------------------------------------------
TV = {  # method: (sparsifier, consensus, default normalize)
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, True),
    "breadcrumbs": ("outliers", False, False),
    "breadcrumbs_ties": ("outliers", True, False),
}


@pytest.mark.parametrize("method", list(TV))
@pytest.mark.parametrize("density", [0.35, 1.0])
def test_task_vector_methods_match_reference(tmp_path, method, density):
    kind, consensus, normalize = TV[method]
    base, models = make_set()
    weights = [0.5, 1.25, -0.75] if method == "task_arithmetic" else [0.5, 1.25, 0.75]
    densities = [density, density * 0.5 if density < 1 else 1.0, 0.9]
    gammas = [0.05, 0.0, 0.1]
    mp = [{"weight": w} for w in weights]
    if kind:
        for m, d, gm in zip(mp, densities, gammas):
            m["density"] = d
            if kind == "outliers":
                m["gamma"] = gm
    out = run_merge(tmp_path, method, models, base, mp, parameters={"lambda": 0.5})
    for name in base:
        keeps = [ref_keep(m[name] - base[name], kind, d, gm) for m, d, gm in zip(models, densities, gammas)]
        expected = ref_task_vectors(base[name], [m[name] for m in models], weights, keeps, consensus, normalize,
                                    lam=0.5)
        assert torch.equal(out[name], expected), name


def test_ties_rescale_matches_l1_reference(tmp_path):
    base, models = make_set()
    mp = [{"weight": 0.5, "density": 0.3}, {"weight": 0.25, "density": 0.6}]
    out = run_merge(tmp_path, "ties", models[:2], base, mp, parameters={"rescale": True, "normalize": False})
    for name in base:
        keeps = [ref_keep(m[name] - base[name], "magnitude", p["density"]) for m, p in zip(models, mp)]
        expected = ref_task_vectors(base[name], [m[name] for m in models[:2]], [0.5, 0.25], keeps, True, False,
                                    rescale_l1=True)
        close(out[name], expected, rtol=1e-6, atol=1e-6)


def test_ties_on_random_floats(tmp_path):
    base, models = make_set(dyadic_data=False, seed=3)
    mp = [{"weight": 1.0, "density": 0.2}] * 3
    out = run_merge(tmp_path, "ties", models, base, mp)
    for name in base:
        keeps = [ref_keep(m[name] - base[name], "magnitude", 0.2) for m in models]
        close(out[name], ref_task_vectors(base[name], [m[name] for m in models], [1.0] * 3, keeps, True, True))


def test_task_vectors_zero_deltas_and_single_model(tmp_path):
    base, models = make_set()
    for method in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "model_stock"):
        same = [dict(base), dict(base)]
        mp = [{"density": 0.5}] * 2 if method not in ("task_arithmetic", "model_stock") else None
        out = run_merge(tmp_path / method, method, same, base, mp)
        for name in base:
            assert torch.equal(out[name], base[name]), (method, name)
    # one model plus a base: TIES is that model's pruned task vector (normalized by its own weight)
    out = run_merge(tmp_path / "single", "ties", models[:1], base, [{"weight": 0.5, "density": 0.4}])
    for name in base:
        keep = ref_keep(models[0][name] - base[name], "magnitude", 0.4)
        assert torch.equal(out[name], base[name] + (models[0][name] - base[name]) * keep * 0.5 / 0.5)


def test_all_equal_models_ties_gives_that_model(tmp_path):
    base, models = make_set()
    out = run_merge(tmp_path, "ties", [models[0]] * 3, base, [{"weight": 1.0, "density": 1.0}] * 3)
    for name in base:
        assert torch.equal(out[name], base[name] + (models[0][name] - base[name]))


# -- random methods ------------------------------------------------------------------------------------------
def test_dare_linear_keeps_density_rescaled_and_is_reproducible(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(400, 700, generator=g)}
    model = {"w": base["w"] + torch.randn(400, 700, generator=g)}
    runs = [run_merge(tmp_path / f"r{i}", "dare_linear", [model], base, [{"density": 0.3}], chunk=c, seed=7)
            for i, c in enumerate((GRID, GRID * 5, None))]
    delta = model["w"] - base["w"]
    got = runs[0]["w"] - base["w"]
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    close(got[kept], delta[kept] / 0.3, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(runs[0]["w"], r["w"]) for r in runs[1:])
    other_seed = run_merge(tmp_path / "s", "dare_linear", [model], base, [{"density": 0.3}], seed=8)
    assert not torch.equal(other_seed["w"], runs[0]["w"])


def plain_dare_prune(delta, density, weight, seed, name, stream):
    """DARE of a whole tensor written plainly (the tensor's Philox draws compared in its dtype, dropped entries
    +0, kept ones divided by the density), times the weight: what the fused per-thread pass must equal."""
    from streammerge.methods.streaming import Uniform
    draws = torch.from_numpy(Uniform(seed, name, stream).fill(0, np.empty(delta.numel(), dtype=np.float32)))
    draws = draws.view(delta.shape)
    kept = torch.where(draws.double() < torch.tensor(density, dtype=delta.dtype).item(), delta,
                       torch.zeros((), dtype=delta.dtype))
    return kept.div_(density).mul_(weight)


@pytest.mark.parametrize("dtype, chunk, threads", [("float32", None, 1), ("float32", None, 3),
                                                   ("float64", GRID, 2)])
def test_dare_equals_plain_pruning_bit_for_bit(tmp_path, dtype, chunk, threads, monkeypatch):
    """Tensors split between chunks and threads (each part drawing from its first element), and small tensors
    merged as one run (each from its own stream): the bits of pruning each whole tensor plainly."""
    from streammerge import cpu
    monkeypatch.setattr(cpu, "merge_threads", lambda cores, load, writer_core: threads)
    g = torch.Generator().manual_seed(8)
    shapes = {"w": (600, 500), "v": (3001,), "b1": (7,), "b2": (130,)}  # "w": 4 threads' worth of draws
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    p = {"weight": 0.7, "density": 0.3}
    out = run_merge(tmp_path, "dare_linear", [model], base, [p], chunk=chunk, seed=7, dtype=dtype)
    acc = getattr(torch, dtype)
    for name in shapes:
        b = base[name].to(acc)
        pruned = plain_dare_prune(model[name].to(acc) - b, p["density"], p["weight"], 7, name, 0)
        assert torch.equal(out[name], torch.add(b, torch.zeros_like(b).add_(pruned)).float()), name


def _masks_from_single_runs(tmp_path, method, models, base, mp, **top):
    """Each model's kept entries and their scale, read off runs where only that model has weight."""
    masks = []
    for i in range(len(models)):
        one_hot = [dict(p, weight=1.0 if j == i else 0.0) for j, p in enumerate(mp)]
        out = run_merge(tmp_path / f"only{i}", method, models, base, one_hot, **top)
        masks.append({k: ((out[k] - base[k]), (models[i][k] - base[k])) for k in base})
    return masks


def test_dare_ties_is_ties_consensus_on_dare_pruned_deltas(tmp_path):
    base, models = make_set(2, dyadic_data=False, seed=5)
    mp = [{"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.6}]
    singles = _masks_from_single_runs(tmp_path, "dare_linear", models, base, mp, seed=3)
    out = run_merge(tmp_path / "ties", "dare_ties", models, base, mp, seed=3)
    for name in base:
        keeps = [single[name][0] != 0 for single in singles]
        for keep, p in zip(keeps, mp):
            assert abs(keep.float().mean().item() - p["density"]) < 0.1
        expected = ref_task_vectors(base[name], [m[name] for m in models], [0.7, 0.4], keeps, True, False,
                                    scales=[0.5, 0.6])
        close(out[name], expected)


def della_probabilities(delta, density, epsilon):
    """Keep probability of each entry: density - eps .. density + eps by ascending magnitude rank along dim 1."""
    d = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.sort(d.abs(), dim=1, stable=True).indices.argsort(dim=1).double()
    span = d.shape[1]
    norm = ranks / (span - 1) if span > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + norm * 2 * epsilon).view(delta.shape)


def test_della_keeps_by_rank_probability_and_rescales(tmp_path):
    base, models = make_set(2, shape=(64, 300), dyadic_data=False, seed=9)
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}, {"weight": 1.0, "density": 0.4, "epsilon": 0.2}]
    singles = _masks_from_single_runs(tmp_path, "della_linear", models, base, mp, seed=11)
    for (name, (got, delta)), p in [(("w", s["w"]), q) for s, q in zip(singles, mp)]:
        probability = della_probabilities(delta, p["density"], p["epsilon"])
        kept = got != 0
        close(got[kept], (delta / probability.float())[kept])
        # entries in the top third of ranks are kept far more often than those in the bottom third
        top, bottom = probability > p["density"] + p["epsilon"] / 3, probability < p["density"] - p["epsilon"] / 3
        assert kept[top].float().mean() > kept[bottom].float().mean() + p["epsilon"]
    out = run_merge(tmp_path / "della", "della", models, base, mp, seed=11)
    for name in base:
        keeps = [s[name][0] != 0 for s in singles]
        scales = [della_probabilities(m[name] - base[name], p["density"], p["epsilon"]).float()
                  for m, p in zip(models, mp)]
        expected = ref_task_vectors(base[name], [m[name] for m in models], [1.0, 1.0], keeps, True, True,
                                    scales=scales)
        close(out[name], expected)


def test_della_refuses_epsilon_outside_density(tmp_path):
    base, models = make_set(1)
    with pytest.raises(PlanError, match="epsilon"):
        run_merge(tmp_path, "della", models, base, [{"density": 0.9, "epsilon": 0.2}])


def plain_della_prune(delta, density, epsilon, seed, name, stream):
    """DELLA pruning of a whole tensor written plainly (stable argsort ranks along dimension 1, the tensor's
    Philox draws, kept entries divided by their probability): what the fast per-row-batch path must equal."""
    from streammerge.methods.streaming import Uniform
    grid = delta.reshape(1, -1, 1) if delta.dim() < 2 else delta.reshape(delta.shape[0], delta.shape[1], -1)
    order = torch.argsort(grid.abs(), dim=1, stable=True)
    span = grid.shape[1]
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(span).view(1, -1, 1).expand_as(order))
    probability = ranks.to(delta.dtype) / (span - 1) if span > 1 else torch.zeros(grid.shape, dtype=delta.dtype)
    probability = (probability * (2 * epsilon) + (density - epsilon)).flatten()
    draws = torch.from_numpy(Uniform(seed, name, stream).fill(0, np.empty(delta.numel(), dtype=np.float32)))
    draws = draws.to(delta.dtype)
    kept = torch.where(draws < probability, delta.flatten(), torch.zeros((), dtype=delta.dtype))
    return (kept / probability).view(delta.shape)


@pytest.mark.parametrize("dtype, chunk, threads", [("float32", None, 1), ("float32", 32 * GRID, 3),
                                                   ("float32", GRID, 3), ("float64", GRID, 1)])
def test_della_equals_plain_pruning_bit_for_bit(tmp_path, dtype, chunk, threads, monkeypatch):
    """Rows ranked in batches by sorted keys (float32) or argsort (float64), units straddling chunk edges,
    rows sorted on several threads: the same bits as ranking each whole tensor with a stable argsort."""
    from streammerge import cpu
    monkeypatch.setattr(cpu, "merge_threads", lambda cores, load, writer_core: threads)
    g = torch.Generator().manual_seed(3)
    # "w": 3 chunks of GRID, rows straddle; in a chunk of 32 GRID, enough rows to rank on 3 threads
    shapes = {"w": (700, 300), "conv": (50, 40, 3, 3), "v": (3000,)}
    base = {k: dyadic(s, g) for k, s in shapes.items()}  # dyadic: many equal magnitudes within a row
    model = {k: v + dyadic(v.shape, g) for k, v in base.items()}
    model["w"][:200] = base["w"][:200] + torch.randn(200, 300, generator=g)  # and distinct ones
    p = {"weight": 1.0, "density": 0.4, "epsilon": 0.25}
    out = run_merge(tmp_path, "della_linear", [model], base, [p], chunk=chunk, seed=7, dtype=dtype)
    acc = getattr(torch, dtype)
    for name in shapes:
        b = base[name].to(acc)
        pruned = plain_della_prune(model[name].to(acc) - b, p["density"], p["epsilon"], 7, name, 0)
        expected = torch.add(b, torch.zeros_like(b).add_(pruned)).float()
        assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("count", [3, 9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_della_merges_every_model_bit_for_bit(tmp_path, method, count, dtype):
    """Every model's pruned deltas in a buffer of their own and merged in one pass (a few models), or weighted and
    added to the sums one model at a time (more models than the buffers hold), in chunks that cut rows, ranked by
    sort keys (float32) or argsort (float64): the bits of the element-wise operations on each model's plain pruning
    (the sums by sign, or from +0), densities of 0 and 1 among them."""
    from test_kernels import by_operations
    g = torch.Generator().manual_seed(count)
    base = {"w": torch.randn(300, 700, generator=g)}
    models = [{"w": base["w"] + 0.1 * torch.randn(300, 700, generator=g)} for _ in range(count)]
    densities = [0.5, 0.0, 0.3, 1.0, 0.6, 0.4, 0.7, 0.5, 0.2][:count]
    mp = [{"weight": 0.1 * (k + 1) * (-1) ** k, "density": d, "epsilon": 0.1 if 0 < d < 1 else 0.0}
          for k, d in enumerate(densities)]
    out = run_merge(tmp_path, method, models, base, mp, chunk=2 * GRID, seed=4, dtype=dtype,
                    parameters={"normalize": True, "lambda": 0.8})
    acc = getattr(torch, dtype)
    b = base["w"].to(acc).flatten()
    deltas = [m["w"].to(acc).flatten() - b for m in models]
    pruned = [plain_della_prune(d.view(300, 700), p["density"], p["epsilon"], 4, "w", k).flatten()
              if 0 < p["density"] < 1 else d if p["density"] >= 1 else torch.zeros_like(d)
              for k, (d, p) in enumerate(zip(deltas, mp))]
    weighted = [torch.mul(d, p["weight"]) for d, p in zip(pruned, mp)]
    if method == "della":
        expected = by_operations(weighted, [p["weight"] for p in mp], b, True, 0.8)
    else:
        total = torch.zeros(b.numel(), dtype=acc)
        for w in weighted:
            total.add_(w)
        expected = torch.add(b, total.div_(sum(p["weight"] for p in mp)).mul_(0.8))
    assert torch.equal(out["w"].flatten(), expected.float())


def test_della_keeps_only_short_rank_probabilities(tmp_path, monkeypatch):
    """The keep probabilities by rank are kept for row lengths that recur, not for a long 1-D tensor's (which
    would stay in memory outside the budget); both give the plain pruning's bits."""
    from streammerge.methods import sparsifiers
    monkeypatch.setattr(sparsifiers, "CACHED_RANKS", 1000)
    sparsifiers._probability_by_rank_cached.cache_clear()
    g = torch.Generator().manual_seed(4)
    shapes = {"w": (40, 300), "w2": (30, 300), "v": (3000,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    p = {"weight": 1.0, "density": 0.4, "epsilon": 0.25}
    out = run_merge(tmp_path, "della_linear", [model], base, [p], seed=7)
    assert sparsifiers._probability_by_rank_cached.cache_info().currsize == 1  # rows of 300 only
    for name in shapes:
        pruned = plain_della_prune(model[name] - base[name], p["density"], p["epsilon"], 7, name, 0)
        assert torch.equal(out[name], torch.add(base[name], torch.zeros_like(base[name]).add_(pruned))), name


# -- interpolation methods -----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(tmp_path, t):
    _, models = make_set(2, dyadic_data=False, seed=2)
    out = run_merge(tmp_path, "slerp", models, parameters={"t": t})
    for name in models[0]:
        if t in (0.0, 1.0):
            assert torch.equal(out[name], models[int(t)][name])
        close(out[name], ref_slerp(t, models[0][name], models[1][name]))


def test_slerp_parallel_and_zero_inputs_interpolate_linearly(tmp_path):
    a = {"w": torch.randn(50, 40)}
    b = {"w": a["w"] * 2}
    out = run_merge(tmp_path / "p", "slerp", [a, b], parameters={"t": 0.25})
    close(out["w"], a["w"] * 0.75 + b["w"] * 0.25)
    zero = {"w": torch.zeros(50, 40)}
    out = run_merge(tmp_path / "z", "slerp", [zero, b], parameters={"t": 0.25})
    close(out["w"], ref_slerp(0.25, zero["w"], b["w"]))


@pytest.mark.parametrize("layout", [{}, {"nuslerp_flatten": False},
                                    {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(tmp_path, layout, with_base):
    base, models = make_set(2, dyadic_data=False, seed=4)
    mp = [{"weight": 1.0}, {"weight": 3.0}]
    out = run_merge(tmp_path, "nuslerp", models, base if with_base else None, mp, parameters=layout)
    kind = "tensor" if layout.get("nuslerp_flatten", True) else (
        "columns" if layout.get("nuslerp_row_wise") else "rows")
    for name in base:
        v0, v1 = models[0][name], models[1][name]
        if with_base:
            expected = base[name].double() + ref_nuslerp(0.75, v0 - base[name], v1 - base[name], kind)
        else:
            expected = ref_nuslerp(0.75, v0, v1, kind)
        close(out[name], expected)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(tmp_path, filter_wise):
    base, models = make_set(3, dyadic_data=False, seed=6)
    # correlated fine-tunes, as model stock expects: a shared direction plus noise
    shared = {k: torch.randn_like(v) for k, v in base.items()}
    models = [{k: base[k] + shared[k] + 0.5 * (m[k] - base[k]) for k in base} for m in models]
    out = run_merge(tmp_path, "model_stock", models, base, parameters={"filter_wise": filter_wise})
    for name in base:
        close(out[name], ref_model_stock(base[name], [m[name] for m in models], filter_wise))


def test_add_difference_and_passthrough(tmp_path):
    _, models = make_set(3)
    out = run_merge(tmp_path / "ad", "add_difference", models, parameters={"alpha": 0.75})
    for name in models[0]:
        assert torch.equal(out[name], models[0][name] + 0.75 * (models[1][name] - models[2][name]))
    out = run_merge(tmp_path / "pt", "passthrough", models[:1], model_params=[{"scale": 0.5}])
    for name in models[0]:
        assert torch.equal(out[name], models[0][name] * 0.5)


# -- config and rules ----------------------------------------------------------------------------------------
def test_rule_per_model_parameter_lists(tmp_path):
    base, models = make_set(2)
    mp = [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    rules = [{"match": "w", "parameters": {"density": [0.5, None], "weight": [0.25, 2.0]}}]
    out = run_merge(tmp_path, "ties", models, base, mp, rules=rules)
    keeps = [ref_keep(models[0]["w"] - base["w"], "magnitude", 0.5), torch.ones_like(base["w"], dtype=torch.bool)]
    assert torch.equal(out["w"], ref_task_vectors(base["w"], [m["w"] for m in models], [0.25, 2.0], keeps,
                                                  True, True))
    keeps = [torch.ones_like(base["b"], dtype=torch.bool)] * 2
    assert torch.equal(out["b"], ref_task_vectors(base["b"], [m["b"] for m in models], [1.0, 1.0], keeps,
                                                  True, True))


@pytest.mark.parametrize("method, n_models, base, message", [
    ("linear", 2, True, "does not use a base"),
    ("ties", 2, False, "needs a base model"),
    ("slerp", 3, False, "exactly 2"),
    ("model_stock", 1, True, "at least 2"),
    ("add_difference", 2, False, "exactly 3"),
])
def test_config_refuses_wrong_inputs(tmp_path, method, n_models, base, message):
    base_set, models = make_set(n_models)
    with pytest.raises(ConfigError, match=message):
        run_merge(tmp_path, method, models, base_set if base else None)


def test_config_refuses_bad_parameter_values(tmp_path):
    base, models = make_set(1)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        run_merge(tmp_path, "ties", models, base, [{"density": 1.5}])
    with pytest.raises(ConfigError, match="list of 1"):
        run_merge(tmp_path, "ties", models, base, rules=[{"match": "*", "density": 0.5}])


def test_merge_help_lists_methods_and_parameters(cli):
    result = cli("merge", "--help")
    assert result.returncode == 0
    for word in ("ties", "dare_linear", "model_stock", "density", "epsilon", "nuslerp_row_wise", "add_difference"):
        assert word in result.stdout


# -- chunk invariance on a tensor of several million elements ------------------------------------------------
INVARIANCE = [
    ("ties", [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.5}, {"weight": 0.5, "density": 0.2}], {}),
    ("ties", [{"weight": 0.6, "density": 0.3}] * 3, {"parameters": {"rescale": True}}),
    ("breadcrumbs_ties", [{"weight": 0.6, "density": 0.8, "gamma": 0.05}] * 3, {}),
    ("dare_ties", [{"weight": 0.6, "density": 0.3}] * 3, {"seed": 5}),
    ("della", [{"weight": 0.6, "density": 0.5, "epsilon": 0.2}] * 3, {"seed": 5}),
    ("model_stock", None, {}),
    ("model_stock", None, {"parameters": {"filter_wise": True}}),
    ("nuslerp", [{"weight": 1.0}, {"weight": 2.0}], {"parameters": {"nuslerp_flatten": False}}),
    ("slerp", None, {"parameters": {"t": 0.4}}),
    ("linear", [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}], {}),
    ("arcee_fusion", None, {}),
    ("sce", None, {"parameters": {"select_topk": 0.3}}),
    ("karcher", None, {}),
    ("multislerp", [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    ("nearswap", None, {"parameters": {"t": 0.005}}),
    ("ram", None, {"parameters": {"epsilon": 0.005}}),
    ("ramplus_tl", None, {"parameters": {"epsilon": 0.005, "r": 0.5, "alpha": 1.0}}),
]
SINGLE_MODEL = ("arcee_fusion", "nearswap")
NO_BASE = ("slerp", "linear", "karcher")


@pytest.fixture(scope="module")
def big_set():
    g = torch.Generator().manual_seed(42)
    shape = (512, 3001)  # 1.54M elements: 24 grid blocks, rows straddling block edges
    base = {"big": torch.randn(shape, generator=g)}
    models = [{"big": base["big"] + 0.01 * torch.randn(shape, generator=g)} for _ in range(3)]
    # bfloat16-like repeated magnitudes, so thresholds fall on ties
    models[0]["big"][:, :1000] = base["big"][:, :1000] + torch.randint(-3, 4, (512, 1000), generator=g) / 256
    return base, models


@pytest.mark.parametrize("method, mp, top", INVARIANCE, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(INVARIANCE)])
def test_results_do_not_depend_on_chunk_size_or_threads(tmp_path, big_set, method, mp, top, monkeypatch):
    from streammerge import cpu
    base, models = big_set
    n_models = 2 if method in ("slerp", "nuslerp") else 1 if method in SINGLE_MODEL else 3
    uses_base = method not in NO_BASE
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runs = []
    # 24 chunks; one chunk with the statistics from the chunk already read; one chunk with streamed passes; the
    # last two again with several intra-op threads (torch splits its work differently then)
    for chunk, in_memory, threads in ((GRID, True, 1), (64 * GRID, True, 1), (64 * GRID, False, 1),
                                      (64 * GRID, True, 3), (64 * GRID, False, 2)):
        monkeypatch.setattr(cpu, "merge_threads", lambda cores, load, writer_core, n=threads: n)
        runs.append(run_merge(tmp_path / f"{chunk}-{in_memory}-{threads}", method, models[:n_models],
                              base if uses_base else None, mp, chunk=chunk,
                              engine_options={"stats_in_memory": in_memory}, **top))
    for other in runs[1:]:
        assert torch.equal(runs[0]["big"], other["big"])
    assert not torch.equal(runs[0]["big"], base["big"])


def test_statistics_of_a_tensor_that_fits_take_one_read(tmp_path, big_set, monkeypatch):
    """The in-memory path is the one taken when the tensor fits (and only then): its inputs are read once, and
    its thresholds are selected on the whole tensor at once rather than by histogram passes. Streamed, the
    magnitudes are gathered in the method's buffers where they fit together (one statistics read), else bracketed
    in one pass
    (ranges around the ranks from the first chunk, the elements inside them kept in the free buffers), and where a
    range misses its rank, selected by the histogram passes after it (one read each). Every path gives the same
    bits."""
    from streammerge.engine import Engine
    from streammerge.methods import sparsifiers, streaming
    base, models = big_set
    reads, histograms = [], []
    original = Engine._context
    monkeypatch.setattr(Engine, "_context", lambda self, task, ws, s, e: reads.append((s, e)) or original(
        self, task, ws, s, e))
    bincount = streaming._bincount
    monkeypatch.setattr(streaming, "_bincount", lambda *a: histograms.append(1) or bincount(*a))
    mp = [{"density": 0.3}] * 2
    fits = run_merge(tmp_path / "fits", "ties", models[:2], base, mp, chunk=64 * GRID)
    assert reads == [(0, base["big"].numel())] and not histograms
    numel = base["big"].numel()
    moved_ranks = streaming._moved_ranks
    # gathered: one statistics pass where the models' |delta| fit ties' 7 buffers together, then the merge pass;
    # else one bracketing pass and the merge pass; where a range misses, two radix-selection passes more
    for name, chunk, passes, counted, misses in (
            ("whole chunk", 64 * GRID, 2, False, False), ("two chunks", 16 * GRID, 2, False, False),
            ("magnitudes that do not fit the buffers together", 4 * GRID, 2, False, False),
            ("a range that misses its rank", 2 * GRID, 4, True, True)):
        reads.clear(), histograms.clear()
        monkeypatch.setattr(streaming, "_moved_ranks", (lambda *a: None) if misses else moved_ranks)
        streamed = run_merge(tmp_path / name, "ties", models[:2], base, mp, chunk=chunk,
                             engine_options={"stats_in_memory": False})
        chunks = -(-numel // chunk)
        assert len(reads) == passes * chunks and bool(histograms) == counted, name
        assert torch.equal(fits["big"], streamed["big"]), name
    monkeypatch.setattr(sparsifiers, "gathering", lambda ctx, models: None)
    monkeypatch.setattr(streaming, "_moved_ranks", moved_ranks)
    reads.clear(), histograms.clear()
    streamed = run_merge(tmp_path / "bracketed", "ties", models[:2], base, mp, chunk=64 * GRID,
                         engine_options={"stats_in_memory": False})
    assert len(reads) == 2 and not histograms  # (a chunk of the whole tensor, observed a tile at a time)
    assert torch.equal(fits["big"], streamed["big"])


def test_sce_computes_the_variance_once_where_it_fits_the_buffers(tmp_path, big_set, monkeypatch):
    """A tensor that fits a chunk: its selection, weights and merge (a tile at a time) see the same chunk, one
    variance. A larger one whose variance fits the method's buffers: gathered there by one pass, selected in memory,
    its kept entries stored as bits, so one variance per element and three reads. Else the bracketing pass and the
    squares pass compute it (and, where the rank lies outside the ranges the first chunk foretold, the histogram
    passes after the bracketing one), the squares pass storing the kept entries as bits for the merge pass. Same
    bits."""
    from streammerge.engine import Engine
    from streammerge.methods import sce, streaming
    base, models = big_set
    models = [{"big": m["big"].clone()} for m in models]
    for m in models:  # entries every model leaves as the base has them: zero variances, which the rank discounts
        m["big"][::3, 7::5] = base["big"][::3, 7::5]
    numel = base["big"].numel()
    calls, reads = [], []
    original = sce.variance
    monkeypatch.setattr(sce, "variance", lambda ctx, out: calls.append(out.numel()) or original(ctx, out))
    context = Engine._context
    monkeypatch.setattr(Engine, "_context", lambda self, task, ws, s, e: reads.append(s) or context(
        self, task, ws, s, e))
    top = {"parameters": {"select_topk": 0.3}}
    fits = run_merge(tmp_path / "fits", "sce", models, base, chunk=64 * GRID, **top)
    assert calls == [numel] and reads == [0]
    moved_ranks = streaming._moved_ranks
    for name, chunk, variances, passes in (("gathered", 16 * GRID, 1, 3), ("bracketed", 2 * GRID, 2, 3),
                                           ("outside the ranges", 2 * GRID, 4, 5)):
        calls.clear(), reads.clear()
        monkeypatch.setattr(streaming, "_moved_ranks", (lambda *a: None) if name == "outside the ranges" else
                            moved_ranks)
        streamed = run_merge(tmp_path / name, "sce", models, base, chunk=chunk, **top)
        chunks = math.ceil(numel / chunk)
        assert chunks > 1 and (numel <= sce.BUFFERS * chunk) == (name == "gathered")
        # (computed a tile at a time: counted in elements)
        assert sum(calls) == variances * numel and len(reads) == passes * chunks, name
        assert torch.equal(fits["big"], streamed["big"]), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sce_ties_at_the_threshold_are_kept_by_position_on_every_path(tmp_path, dtype):
    """Deltas of a few quantized values: thousands of entries share the threshold's variance, and those kept are
    the later ones, whether selected on the whole tensor, gathered in the buffers (the stored bits) or over
    streamed passes (4 radix passes in float64), and as the reference keeps them."""
    from test_mergekit_methods import ref_sce
    from streammerge.methods import sce
    g = torch.Generator().manual_seed(3)
    shape = (640, 1001)
    base = {"big": torch.randint(-64, 64, shape, generator=g) / 16}  # deltas of eighths: exact
    models = [{"big": base["big"] + torch.randint(-2, 3, shape, generator=g) / 8} for _ in range(2)]
    variance = torch.var(torch.stack([m["big"] - base["big"] for m in models]), dim=0, unbiased=False).flatten()
    threshold = variance.sort().values[variance.numel() - int(int(variance.count_nonzero()) * 0.3)]
    assert int((variance == threshold).sum()) > 10000  # the kept ones among them are chosen by position
    top = {"parameters": {"select_topk": 0.3}}
    runs = [run_merge(tmp_path / f"{chunk}", "sce", models, base, chunk=chunk, dtype=dtype, **top)["big"]
            for chunk in (16 * GRID, GRID, 2 * GRID)]  # whole, streamed by histograms, gathered
    assert GRID * sce.BUFFERS < variance.numel() <= 2 * GRID * sce.BUFFERS
    for run in runs[1:]:
        assert torch.equal(runs[0], run)
    assert torch.allclose(runs[0].double(), ref_sce(base["big"], [m["big"] for m in models], 0.3),
                          rtol=1e-6, atol=1e-6)


def test_merge_threads_leave_a_core_for_the_writer_and_one_per_busy_core():
    from streammerge.cpu import MAX_THREADS, merge_threads
    assert merge_threads(1, 0.0) == 1
    assert merge_threads(2, 0.0) == 1  # the writer thread copies output chunks meanwhile
    assert merge_threads(8, 0.0) == 7
    assert merge_threads(8, 3.5) == 4  # cores other processes kept busy are not counted on
    assert merge_threads(8, 20.0) == 1
    assert merge_threads(64, 0.0) == MAX_THREADS
    # heavier math than the writer's copy: every free core
    assert merge_threads(2, 0.0, writer_core=False) == 2
    assert merge_threads(1, 0.0, writer_core=False) == 1
    assert merge_threads(8, 3.5, writer_core=False) == 4
    assert merge_threads(64, 0.0, writer_core=False) == MAX_THREADS


@pytest.mark.parametrize("average, runnable, busy", [(1.0, 1, 0.0), (3.5, 4, 2.5), (3.5, 1, 0.0), (0.5, 3, -0.5)])
def test_other_processes_count_by_the_load_average_unless_nothing_else_runs_now(monkeypatch, average, runnable,
                                                                                  busy):
    from streammerge import cpu
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (average, average, average))
    monkeypatch.setattr(cpu, "_read", lambda path: f"{average} {average} {average} {runnable}/300 4242")
    assert cpu.others_busy() == busy


@pytest.mark.parametrize("method, threads", [("linear", 1), ("ties", 2)])
def test_a_merge_leaves_the_writer_a_core_only_for_light_math(tmp_path, monkeypatch, method, threads):
    from streammerge import cpu
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "others_busy", lambda: 0.0)
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    base = {"w": torch.randn(64, 8)}
    models = [{"w": base["w"] + torch.randn(64, 8)} for _ in range(2)]
    p = {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}
    run_merge(tmp_path, method, models, base if method == "ties" else None, [p, p])
    assert seen[0] == threads


@pytest.mark.parametrize("method, own_threads", [("dare_linear", True), ("della", True), ("arcee_fusion", True),
                                                 ("ties", False), ("breadcrumbs", False)])
def test_methods_on_their_own_threads_hold_torch_to_one(tmp_path, monkeypatch, method, own_threads):
    """The methods whose math runs on the merge's own threads (random draws, DELLA's sorts, arcee_fusion's kernels)
    split it between the threads the policy chose while torch is held to one thread (its OpenMP threads would spin
    on the same cores); the others keep torch's threads for their math and the same count for their own. Both are
    restored after the merge."""
    from streammerge import cpu
    from streammerge.methods import streaming
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "others_busy", lambda: 0.0)
    seen = set()  # (torch's threads, the merge's own) at each split of work between threads (`in_parallel`)
    real_parts = streaming.thread_parts
    monkeypatch.setattr(streaming, "thread_parts", lambda n, grain: (
        seen.add((torch.get_num_threads(), real_parts(1 << 20, 1))), real_parts(n, grain))[1])
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(64, 1024, generator=g)}
    count = 1 if method == "arcee_fusion" else 2
    models = [{"w": base["w"] + torch.randn(64, 1024, generator=g)} for _ in range(count)]
    parameters = {"arcee_fusion": {}, "ties": {"weight": 0.5, "density": 0.5},
                  "breadcrumbs": {"weight": 0.5, "density": 0.5, "gamma": 0.01}, "dare_linear": {"weight": 0.5,
                  "density": 0.5}, "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}[method]
    run_merge(tmp_path, method, models, base, [parameters] * len(models))
    assert seen == ({(1, 2)} if own_threads else {(2, 2)})
    assert torch.get_num_threads() == before and cpu.pool_threads() == before


def test_merge_restores_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    base, models = make_set()
    run_merge(tmp_path, "ties", models[:2], base, [{"density": 0.5}] * 2)
    assert torch.get_num_threads() == before


def test_chunks_are_aligned_to_the_grid():
    from streammerge.memory import Budget
    for limit in (300 * 2**20, 517 * 2**20 + 12345):
        budget = Budget(limit, 37, 2**30, baseline=100 * 2**20)
        assert budget.chunk_elements % GRID == 0


def test_della_refuses_units_larger_than_its_memory(tmp_path):
    """A 1-D tensor is ranked as one unit: in float32 (ranked by int64 keys) up to half a chunk, the same bits as
    with room to spare; in float64 (torch's argsort) up to an eighth; larger units are refused, unless every model
    keeps all of its deltas or none (nothing to rank)."""
    g = torch.Generator().manual_seed(0)
    params = [{"density": 0.5, "epsilon": 0.1}]
    base = {"v": torch.randn(GRID * 3, generator=g)}
    model = {"v": base["v"] + torch.randn(GRID * 3, generator=g)}
    with pytest.raises(StreamMergeError, match="raise max_ram"):
        run_merge(tmp_path / "3", "della", [model], base, params, chunk=4 * GRID)
    unranked = [{"density": 1.0, "epsilon": 0.0}, {"density": 0.0, "epsilon": 0.0}]
    out = run_merge(tmp_path / "3-all", "della_linear", [model, model], base, unranked, chunk=4 * GRID)
    assert torch.equal(out["v"], torch.add(base["v"], torch.zeros(GRID * 3).add_(model["v"] - base["v"])))
    half = {"v": base["v"][:GRID * 2]}, {"v": model["v"][:GRID * 2]}
    tight = run_merge(tmp_path / "2", "della", [half[1]], half[0], params, chunk=4 * GRID)
    assert torch.equal(tight["v"], run_merge(tmp_path / "2-wide", "della", [half[1]], half[0], params)["v"])
    with pytest.raises(StreamMergeError, match="raise max_ram"):
        run_merge(tmp_path / "2-64", "della", [half[1]], half[0], params, chunk=4 * GRID, dtype="float64")


def test_float64_accumulation_selects_the_same_entries(tmp_path):
    base, models = make_set()
    mp = [{"weight": 0.5, "density": 0.3, "gamma": 0.1}, {"weight": 0.75, "density": 0.6, "gamma": 0.0}]
    for method, kind in (("ties", "magnitude"), ("breadcrumbs_ties", "outliers")):
        params = [{k: v for k, v in p.items() if k != "gamma" or kind == "outliers"} for p in mp]
        out = run_merge(tmp_path / method, method, models[:2], base, params, dtype="float64")
        for name in base:
            keeps = [ref_keep(m[name] - base[name], kind, p["density"], p["gamma"]) for m, p in zip(models, mp)]
            expected = ref_task_vectors(base[name].double(), [m[name].double() for m in models[:2]], [0.5, 0.75],
                                        keeps, True, method == "ties")
            assert torch.equal(out[name].double(), expected.float().double()), (method, name)


def test_readme_methods_table_is_in_sync_with_the_registry():
    from methods_table import README, table

    assert table() in README.read_text(), "run: python scripts/methods_table.py --write"
