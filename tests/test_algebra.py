"""Tests of lightning_alphaedit.algebra against explicit float64 formulas written here.

Conventions as in the module: keys (n, d_in) rows, residuals (n, d_out), delta (d_out, d_in).
The covariance C0 is built with a known spectrum, C0 = Q diag(lam) Q^T, so the null space
(Q's columns with tiny eigenvalues) and the preserved span (large eigenvalues) are known
without calling the module.
"""

import io
import subprocess
import sys

import pytest
import torch

from lightning_alphaedit.algebra import (
    default_threshold,
    KeyMoments,
    NullSpace,
    alphaedit_delta,
    blended_moment,
    leakage_in_subspace,
    memit_delta,
    null_space,
    null_space_projector,
    project_cache,
    update_cache,
)

F64 = torch.float64
D_IN, D_OUT, N = 32, 16, 8
R_NULL = D_IN // 2  # tiny eigenvalues on half of the directions


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    Q, Rq = torch.linalg.qr(randn(d, d, g=g))
    return Q * torch.sign(torch.diagonal(Rq))  # (d, d), columns orthonormal


def spectrum_c0(seed: int = 0, d_in: int = D_IN, r_null: int = R_NULL):
    """C0 = Q diag(lam) Q^T with lam = 1e-4 on the first r_null columns (the null space)
    and lam in [0.5, 1.5] on the rest (the preserved span): a clear gap around 2e-2."""
    g = gen(seed)
    Q = random_orthogonal(d_in, g)
    lam = torch.cat([torch.full((r_null,), 1e-4, dtype=F64), 0.5 + torch.rand(d_in - r_null, generator=g, dtype=F64)])
    C0 = Q @ torch.diag(lam) @ Q.T  # (d_in, d_in)
    return C0, Q[:, :r_null], Q[:, r_null:], lam  # C0, U_null, U_kept, eigenvalues


def ref_projector_delta(K, R, P, Cp, l2):
    """The reference code's solve in float64: delta^T = solve(P (K^T K + Cp) + l2 I, P K^T R)."""
    K, R, P = K.to(F64), R.to(F64), P.to(F64)
    d_in = K.shape[1]
    Cp = torch.zeros(d_in, d_in, dtype=F64) if Cp is None else Cp.to(F64)
    A = P @ (K.T @ K + Cp) + l2 * torch.eye(d_in, dtype=F64)
    B = P @ K.T @ R
    return torch.linalg.solve(A, B).T  # (d_out, d_in)


def ref_memit_delta(K, R, C0, Cp, w):
    K, R, C0 = K.to(F64), R.to(F64), C0.to(F64)
    A = w * C0 + K.T @ K + (0 if Cp is None else Cp.to(F64))
    return torch.linalg.solve(A, K.T @ R).T  # (d_out, d_in)


# -----------------------------------------------------------------------------
# KeyMoments


def test_key_moments_mean_mixed_dtypes():
    g = gen(1)
    batches = [
        randn(5, D_IN, g=g, dtype=torch.float32),
        randn(7, D_IN, g=g, dtype=F64),
        randn(4, D_IN, g=g, dtype=torch.bfloat16),
        randn(6, D_IN, g=g, dtype=torch.float16),
    ]
    m = KeyMoments(D_IN)
    for b in batches:
        assert m.add(b) is m
    K = torch.cat([b.to(F64) for b in batches])  # the values as the batches hold them
    assert m.count == K.shape[0] == 22
    assert m.sum.dtype == torch.float32 and m.sum.shape == (D_IN, D_IN)
    assert rel(m.sum.to(F64), K.T @ K) < 1e-6
    assert rel(m.mean().to(F64), K.T @ K / K.shape[0]) < 1e-6

    m64 = KeyMoments(D_IN, dtype=F64)
    for b in batches:
        m64.add(b)
    assert m64.mean().dtype == F64
    assert rel(m64.mean(), K.T @ K / K.shape[0]) < 1e-12


def test_key_moments_merge_halves_equals_whole():
    g = gen(2)
    batches = [randn(n, D_IN, g=g, dtype=torch.float32) for n in (4, 9, 6, 11)]
    whole, a, b = KeyMoments(D_IN), KeyMoments(D_IN), KeyMoments(D_IN)
    for i, x in enumerate(batches):
        whole.add(x)
        (a if i < 2 else b).add(x)
    assert a.merge(b) is a
    assert a.count == whole.count == 30
    torch.testing.assert_close(a.sum, whole.sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.mean(), whole.mean(), rtol=1e-6, atol=1e-6)


def test_key_moments_state_dict_round_trip():
    g = gen(3)
    m = KeyMoments(D_IN, dtype=F64)
    m.add(randn(9, D_IN, g=g))
    sd = m.state_dict()
    assert set(sd) == {"sum", "count"}
    assert sd["count"].dtype == torch.int64 and sd["count"].dim() == 0 and int(sd["count"]) == 9
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = KeyMoments.from_state_dict(torch.load(buf))
    assert m2.count == 9 and m2.dim == D_IN and m2.sum.dtype == F64
    torch.testing.assert_close(m2.mean(), m.mean(), rtol=0, atol=0)
    m2.add(randn(3, D_IN, g=g))  # the restored copy is independent of the original
    assert m.count == 9
    assert m.to("cpu") is m and m.sum.device.type == "cpu"


def test_key_moments_errors():
    m = KeyMoments(D_IN)
    with pytest.raises(ValueError, match=r"count == 0"):
        m.mean()
    with pytest.raises(ValueError, match=r"cannot merge KeyMoments of dim 16 into KeyMoments of dim 32"):
        m.merge(KeyMoments(16))
    with pytest.raises(ValueError, match=r"keys must be \(n, dim=32\), got shape \(4, 16\)"):
        m.add(torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"keys must be 2-D"):
        m.add(torch.zeros(D_IN))
    with pytest.raises(TypeError, match=r"floating dtype"):
        m.add(torch.zeros(2, D_IN, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dim must be a positive int"):
        KeyMoments(0)
    with pytest.raises(TypeError, match=r"can only merge a KeyMoments"):
        m.merge(torch.zeros(D_IN, D_IN))


# -----------------------------------------------------------------------------
# null space


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_null_space_known_spectrum(dtype):
    C0, U_null, U_kept, lam = spectrum_c0(seed=4)
    ns = null_space(C0.to(dtype), threshold=2e-2)
    assert isinstance(ns, NullSpace)
    assert ns.rank == int((lam < 2e-2).sum()) == R_NULL and ns.dim == D_IN
    assert ns.basis.dtype == dtype and ns.eigenvalues.dtype == dtype and ns.threshold == 2e-2
    assert ns.basis.shape == (D_IN, R_NULL) and ns.eigenvalues.shape == (D_IN,)
    assert bool((ns.eigenvalues[1:] >= ns.eigenvalues[:-1]).all())  # ascending
    torch.testing.assert_close(ns.eigenvalues.to(F64), torch.sort(lam).values, rtol=1e-5, atol=1e-5)

    tol = 1e-5 if dtype == torch.float32 else 1e-12
    U = ns.basis.to(F64)
    assert (U.T @ U - torch.eye(R_NULL, dtype=F64)).abs().max() < tol  # orthonormal
    P = ns.projector().to(F64)
    assert (P - P.T).abs().max() < tol  # symmetric
    assert (P @ P - P).abs().max() < tol  # idempotent
    assert (P - U_null @ U_null.T).abs().max() < 10 * tol  # the known null space
    assert (P @ U_kept).abs().max() < 10 * tol  # annihilates large-eigenvalue eigenvectors
    assert (P @ U_null - U_null).abs().max() < 10 * tol  # keeps the small ones
    known = U_null @ U_null.T  # (d, d) from the spectrum the test built, not from null_space
    assert (null_space_projector(C0.to(dtype)).to(F64) - known).abs().max() < 10 * tol


def test_null_space_rank_follows_threshold():
    g = gen(5)
    Q = random_orthogonal(24, g)
    lam = torch.tensor([1e-6, 1e-4, 5e-3, 1.5e-2, 3e-2, 0.1] + [1.0] * 18, dtype=F64)
    C0 = Q @ torch.diag(lam) @ Q.T
    for threshold, rank in [(1e-5, 1), (1e-3, 2), (2e-2, 4), (5e-2, 5), (10.0, 24), (1e-7, 0)]:
        ns = null_space(C0, threshold=threshold)
        assert ns.rank == rank == int((lam < threshold).sum())
        if rank == 0:
            assert ns.basis.shape == (24, 0)
            assert (ns.projector() == 0).all()


def test_null_space_without_a_threshold_uses_the_rules_default():
    """threshold None means each rule's documented default, counted on a known spectrum."""
    g = gen(5)
    Q = random_orthogonal(24, g)
    lam = torch.tensor([1e-6, 1e-4, 5e-3, 1.5e-2, 3e-2, 0.1] + [1.0] * 18, dtype=F64)
    C0 = Q @ torch.diag(lam) @ Q.T
    expected = {"absolute": 4, "relative": 3, "fraction": 16, "energy": 11}  # < 2e-2; < 1e-2 x 1; floor(0.7 x 24); 0.15 + 5 <= 0.3 x 18.15
    for rule, rank in expected.items():
        space = null_space(C0, threshold=None, rule=rule)
        assert space.rank == rank, rule
        assert space.threshold == default_threshold(rule)


def test_null_space_symmetrises_input():
    C0, U_null, _, _ = spectrum_c0(seed=6)
    skew = randn(D_IN, D_IN, g=gen(7)) * 1e-9
    ns = null_space(C0 + skew - skew.T, threshold=2e-2)
    assert ns.rank == R_NULL
    assert (ns.projector() - U_null @ U_null.T).abs().max() < 1e-7


def test_null_space_errors():
    with pytest.raises(ValueError, match=r"second_moment must be square \(d_in, d_in\), got shape \(4, 5\)"):
        null_space(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"second_moment must be 2-D"):
        null_space(torch.zeros(4))
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite"):
        null_space(bad)
    with pytest.raises(ValueError, match=r"threshold must be a finite number > 0"):
        null_space(torch.eye(4), threshold=0.0)
    with pytest.raises(ValueError, match=r"threshold must be a finite number > 0"):
        null_space(torch.eye(4), threshold=-1.0)


# -----------------------------------------------------------------------------
# cache helpers


def test_update_and_project_cache():
    g = gen(8)
    C0, U_null, _, _ = spectrum_c0(seed=8)
    K1, K2 = randn(5, D_IN, g=g), randn(7, D_IN, g=g)
    C = update_cache(None, K1)
    torch.testing.assert_close(C, K1.T @ K1)
    C = update_cache(C, K2)
    torch.testing.assert_close(C, K1.T @ K1 + K2.T @ K2)
    assert update_cache(None, K1.float()).dtype == torch.float32

    ns = null_space(C0)
    torch.testing.assert_close(project_cache(C, ns), ns.basis.T @ C @ ns.basis)
    assert project_cache(C, ns).shape == (R_NULL, R_NULL)
    with pytest.raises(ValueError, match=r"cache must be \(d_in, d_in\) = \(32, 32\), got shape \(16, 16\)"):
        project_cache(torch.zeros(16, 16), ns)
    with pytest.raises(ValueError, match=r"cache must be \(d_in, d_in\) = \(32, 32\), got shape \(3, 3\)"):
        update_cache(torch.zeros(3, 3), K1)


# -----------------------------------------------------------------------------
# AlphaEdit's update


def _problem(seed: int, n: int = N, d_out: int = D_OUT, with_cache: bool = True):
    g = gen(seed)
    K = randn(n, D_IN, g=g)  # (n, d_in)
    R = randn(n, d_out, g=g)  # (n, d_out)
    Kp = randn(10, D_IN, g=g)
    Cp = Kp.T @ Kp if with_cache else None  # earlier batches' keys
    return K, R, Cp


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("l2", [10.0, 1.0])
def test_alphaedit_projector_form_matches_reference(with_cache, l2):
    C0, U_null, _, _ = spectrum_c0(seed=9)
    P = U_null @ U_null.T  # the known projector, built without the module
    K, R, Cp = _problem(10, with_cache=with_cache)
    expected = ref_projector_delta(K, R, P, Cp, l2)

    delta = alphaedit_delta(K, R, P, Cp, l2=l2)
    assert delta.shape == (D_OUT, D_IN) and delta.dtype == F64
    assert rel(delta, expected) < 1e-10

    delta32 = alphaedit_delta(K.float(), R.float(), P.float(), None if Cp is None else Cp.float(), l2=l2)
    assert delta32.dtype == torch.float32
    assert rel(delta32.to(F64), expected) < 1e-4

    delta64 = alphaedit_delta(K.float(), R.float(), P.float(), None if Cp is None else Cp.float(), l2=l2,
                              compute_dtype=F64)
    assert delta64.dtype == F64 and rel(delta64, expected) < 1e-5


@pytest.mark.parametrize("with_cache", [False, True])
def test_alphaedit_subspace_form_matches_projector_form(with_cache):
    C0, _, _, _ = spectrum_c0(seed=11)
    ns = null_space(C0)
    K, R, Cp = _problem(12, with_cache=with_cache)
    U = ns.basis
    expected = ref_projector_delta(K, R, U @ U.T, Cp, 10.0)

    assert rel(alphaedit_delta(K, R, ns, Cp), expected) < 1e-5
    assert rel(alphaedit_delta(K, R, ns.projector(), Cp), expected) < 1e-5
    if with_cache:
        Cp_sub = U.T @ Cp @ U  # (r, r), projected here, not by the module
        assert rel(alphaedit_delta(K, R, ns, Cp_sub), expected) < 1e-5
        assert rel(alphaedit_delta(K, R, ns, Cp_sub, cache_in_subspace=True), expected) < 1e-5
        assert rel(alphaedit_delta(K, R, ns, Cp, cache_in_subspace=False), expected) < 1e-5

    # float32 end to end agrees as well
    ns32 = null_space(C0.float())
    d32 = alphaedit_delta(K.float(), R.float(), ns32, None if Cp is None else Cp.float())
    assert d32.dtype == torch.float32 and rel(d32.to(F64), expected) < 1e-4


@pytest.mark.parametrize("leakage_weight", [3000.0, 100.0])
def test_leakage_penalty_subspace_form_matches_the_full_formula(leakage_weight):
    """delta^T = solve(P (K^T K + C_p + lambda1 C0) + lambda I, P K^T R), written here in float64,
    against the r x r solve that only gains lambda1 diag(s)."""
    C0, _, _, _ = spectrum_c0(seed=21)
    # eigenvalues below the threshold but not all equal, so diag(s) is not a multiple of I
    C0 = C0 + 1e-3 * torch.diag(torch.linspace(0, 1, D_IN, dtype=F64))
    ns = null_space(C0)
    assert 0 < ns.rank < D_IN
    K, R, Cp = _problem(22)
    P = ns.basis @ ns.basis.T
    d_in = K.shape[1]
    A = P @ (K.T @ K + Cp + leakage_weight * C0) + 10.0 * torch.eye(d_in, dtype=F64)
    expected = torch.linalg.solve(A, P @ K.T @ R).T  # (d_out, d_in)

    leakage = leakage_in_subspace(ns, leakage_weight)
    torch.testing.assert_close(leakage, leakage_weight * ns.basis.T @ C0 @ ns.basis, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(leakage_in_subspace(ns, leakage_weight, C0), leakage, rtol=1e-9, atol=1e-9)
    assert rel(alphaedit_delta(K, R, ns, Cp, leakage=leakage), expected) < 1e-9
    assert rel(alphaedit_delta(K, R, P, Cp, leakage=leakage_weight * C0), expected) < 1e-9
    # the penalty changes the update (the test would see a dropped term)
    assert rel(alphaedit_delta(K, R, ns, Cp), expected) > 1e-3
    with pytest.raises(ValueError, match=r"leakage must be \(r, r\)"):
        alphaedit_delta(K, R, ns, Cp, leakage=leakage_weight * C0)
    with pytest.raises(ValueError, match="leakage_weight"):
        leakage_in_subspace(ns, -1.0)


def test_zero_leakage_reproduces_the_update_exactly():
    C0, _, _, _ = spectrum_c0(seed=23)
    ns = null_space(C0)
    K, R, Cp = _problem(24)
    plain = alphaedit_delta(K, R, ns, Cp)
    assert torch.equal(alphaedit_delta(K, R, ns, Cp, leakage=leakage_in_subspace(ns, 0.0)), plain)


def test_blended_moment_formula():
    C0, _, _, _ = spectrum_c0(seed=25)
    _, _, Cp = _problem(26)
    M = blended_moment(Cp.float(), 40, C0, 3.0)
    assert M.dtype == F64
    torch.testing.assert_close(M, (Cp / 40 + 3.0 * C0) / 4.0, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="at least one edit"):
        blended_moment(Cp, 0, C0, 3.0)


def test_alphaedit_full_rank_cache_shape_ambiguity():
    """r == d_in: a (d_in, d_in) cache is the FULL C_p unless cache_in_subspace=True."""
    C0, _, _, _ = spectrum_c0(seed=13)
    ns = null_space(C0, threshold=10.0)  # every direction is "null"
    assert ns.rank == D_IN
    U = ns.basis
    K, R, Cp = _problem(14)
    expected = ref_projector_delta(K, R, U @ U.T, Cp, 10.0)  # P = I here
    assert rel(alphaedit_delta(K, R, ns, Cp), expected) < 1e-10
    assert rel(alphaedit_delta(K, R, ns, U.T @ Cp @ U, cache_in_subspace=True), expected) < 1e-10
    # the same matrix read as already projected is a different problem
    assert rel(alphaedit_delta(K, R, ns, Cp, cache_in_subspace=True), expected) > 1e-3


def test_alphaedit_rank_zero_is_zero_delta():
    C0, _, _, _ = spectrum_c0(seed=15)
    ns = null_space(C0, threshold=1e-6)
    assert ns.rank == 0
    K, R, Cp = _problem(16)
    delta = alphaedit_delta(K, R, ns, Cp)
    assert delta.shape == (D_OUT, D_IN) and bool((delta == 0).all())
    assert bool((alphaedit_delta(K, R, ns.projector(), Cp) == 0).all())


@pytest.mark.parametrize("form", ["projector", "subspace"])
def test_alphaedit_leaves_preserved_keys_alone(form):
    C0, _, U_kept, _ = spectrum_c0(seed=17)
    g = gen(18)
    k0 = U_kept @ randn(U_kept.shape[1], 6, g=g)  # (d_in, 6) keys in the preserved span
    K, R, Cp = _problem(19)
    for dtype, tol in [(torch.float32, 1e-5), (F64, 1e-12)]:
        ns = null_space(C0.to(dtype))
        arg = ns if form == "subspace" else ns.projector()
        delta = alphaedit_delta(K.to(dtype), R.to(dtype), arg, Cp.to(dtype))
        out = delta.to(F64) @ k0  # (d_out, 6)
        assert out.norm() / (delta.to(F64).norm() * k0.norm()) < tol
        assert delta.norm() > 0


@pytest.mark.parametrize("form", ["projector", "subspace"])
def test_alphaedit_reduces_residual_for_null_space_keys(form):
    C0, U_null, _, _ = spectrum_c0(seed=20)
    g = gen(21)
    n = 6  # n <= r: the keys can be fitted exactly inside the null space
    K = (U_null @ randn(R_NULL, n, g=g)).T  # (n, d_in), keys inside the null space
    R = randn(n, D_OUT, g=g)
    ns = null_space(C0)
    arg = ns if form == "subspace" else ns.projector()
    delta = alphaedit_delta(K, R, arg, l2=10.0)
    assert (K @ delta.T - R).norm() < 0.9 * R.norm()
    # with a tiny ridge the fit is (almost) exact
    delta = alphaedit_delta(K, R, arg, l2=1e-6)
    assert (K @ delta.T - R).norm() < 1e-4 * R.norm()


# -----------------------------------------------------------------------------
# MEMIT, the baseline


@pytest.mark.parametrize("with_cache", [False, True])
def test_memit_matches_reference(with_cache):
    C0, _, _, _ = spectrum_c0(seed=22)
    K, R, Cp = _problem(23, with_cache=with_cache)
    for w in (15000.0, 1.0):
        expected = ref_memit_delta(K, R, C0, Cp, w)
        delta = memit_delta(K.float(), R.float(), C0.float(), None if Cp is None else Cp.float(), mom2_weight=w)
        assert delta.dtype == F64 and delta.shape == (D_OUT, D_IN)
        Cp32 = None if Cp is None else Cp.float()
        assert rel(delta, ref_memit_delta(K.float(), R.float(), C0.float(), Cp32, w)) < 1e-8
        assert rel(delta, expected) < 1e-3  # float32 rounding of the inputs only
        assert rel(memit_delta(K, R, C0, Cp, mom2_weight=w), expected) < 1e-10


def test_memit_disturbs_preserved_keys_where_alphaedit_does_not():
    """The paper's point: edit keys live mostly in the span of the preserved keys, so
    MEMIT's update moves preserved keys' outputs, while AlphaEdit's cannot."""
    C0, U_null, U_kept, _ = spectrum_c0(seed=24)
    g = gen(25)
    K = (U_kept @ randn(U_kept.shape[1], N, g=g) + 0.01 * U_null @ randn(R_NULL, N, g=g)).T  # (n, d_in)
    R = randn(N, D_OUT, g=g)
    k0 = U_kept @ randn(U_kept.shape[1], 6, g=g)  # preserved keys

    def disturbance(delta):
        """(|delta k0| / |k0|) / (|delta K1^T| / |K1|): how much preserved keys' outputs move,
        per unit of key norm, compared with the edited keys' own outputs; and |delta k0|
        relative to |delta| |k0|."""
        delta = delta.to(F64)
        moved = ((delta @ k0).norm() / k0.norm()) / ((K @ delta.T).norm() / K.norm())
        return moved, (delta @ k0).norm() / (delta.norm() * k0.norm())

    memit_moved, memit_k0 = disturbance(memit_delta(K, R, C0))
    alpha_moved, alpha_k0 = disturbance(alphaedit_delta(K, R, null_space(C0)))
    assert memit_moved > 0.1 and memit_k0 > 1e-3  # about 0.43 and 3.5e-3 here
    assert alpha_moved < 1e-10 and alpha_k0 < 1e-10


# -----------------------------------------------------------------------------
# shape errors


def test_alphaedit_shape_errors():
    C0, _, _, _ = spectrum_c0(seed=26)
    ns = null_space(C0)
    P = ns.projector()
    K, R, Cp = _problem(27)
    with pytest.raises(ValueError, match=r"same number of rows n.*keys \(8, 32\), residuals \(7, 16\)"):
        alphaedit_delta(K, R[:7], P)
    with pytest.raises(ValueError, match=r"keys must be 2-D \(n, d_in\), got shape \(32,\)"):
        alphaedit_delta(K[0], R, P)
    with pytest.raises(ValueError, match=r"residuals must be 2-D \(n, d_out\), got shape \(8,\)"):
        alphaedit_delta(K, R[:, 0], P)
    with pytest.raises(ValueError, match=r"projector must be \(d_in, d_in\) = \(32, 32\), got shape \(16, 16\)"):
        alphaedit_delta(K, R, P[:16, :16])
    with pytest.raises(ValueError, match=r"cache must be \(d_in, d_in\) in the projector form = \(32, 32\), got shape \(16, 16\)"):
        alphaedit_delta(K, R, P, Cp[:16, :16])
    with pytest.raises(ValueError, match=r"cache must be the full C_p \(d_in, d_in\) = \(32, 32\) or the projected .* \(r, r\) = \(16, 16\), got shape \(8, 8\)"):
        alphaedit_delta(K, R, ns, Cp[:8, :8])
    with pytest.raises(ValueError, match=r"cache_in_subspace=True needs cache \(r, r\) = \(16, 16\), got shape \(32, 32\)"):
        alphaedit_delta(K, R, ns, Cp, cache_in_subspace=True)
    with pytest.raises(ValueError, match=r"cache_in_subspace=False needs cache \(d_in, d_in\) = \(32, 32\), got shape \(16, 16\)"):
        alphaedit_delta(K, R, ns, Cp[:16, :16], cache_in_subspace=False)
    with pytest.raises(ValueError, match=r"cache_in_subspace=True needs a NullSpace"):
        alphaedit_delta(K, R, P, Cp, cache_in_subspace=True)
    with pytest.raises(ValueError, match=r"null space basis must be \(d_in, r\) with d_in = 24 to match keys \(8, 24\)"):
        alphaedit_delta(K[:, :24], R, ns)
    with pytest.raises(ValueError, match=r"l2 must be a finite number > 0"):
        alphaedit_delta(K, R, P, l2=0.0)
    with pytest.raises(TypeError, match=r"projector must be a torch.Tensor"):
        alphaedit_delta(K, R, "P")


def test_memit_shape_errors():
    C0, _, _, _ = spectrum_c0(seed=28)
    K, R, Cp = _problem(29)
    with pytest.raises(ValueError, match=r"same number of rows n.*keys \(8, 32\), residuals \(5, 16\)"):
        memit_delta(K, R[:5], C0)
    with pytest.raises(ValueError, match=r"second_moment must be \(d_in, d_in\) = \(32, 32\), got shape \(32, 16\)"):
        memit_delta(K, R, C0[:, :16])
    with pytest.raises(ValueError, match=r"cache must be \(d_in, d_in\) = \(32, 32\), got shape \(16, 16\)"):
        memit_delta(K, R, C0, Cp[:16, :16])
    with pytest.raises(ValueError, match=r"mom2_weight must be a finite number >= 0"):
        memit_delta(K, R, C0, mom2_weight=-1.0)


def test_null_space_dataclass_validation():
    with pytest.raises(ValueError, match=r"eigenvalues must be \(d_in,\) = \(8,\) to match basis \(8, 3\)"):
        NullSpace(basis=torch.zeros(8, 3), eigenvalues=torch.zeros(5), threshold=2e-2)
    ns = NullSpace(basis=torch.zeros(8, 3), eigenvalues=torch.zeros(8), threshold=2e-2)
    with pytest.raises(Exception):
        ns.threshold = 1.0  # frozen
    assert ns.to(dtype=F64).basis.dtype == F64


# -----------------------------------------------------------------------------
# packaging


def test_algebra_imports_no_lightning():
    code = (
        "import sys, lightning_alphaedit.algebra; "
        "assert not any(m.split('.')[0] in ('pytorch_lightning','lightning','lightning_fabric') for m in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
