"""
The linear algebra of AlphaEdit: key statistics, the null-space projector and the
closed-form weight updates. Pure torch, no Lightning, no global state, no devices
hard-coded: every result lives on the device of the inputs it was computed from.

AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for
Language Models", ICLR 2025, arXiv 2410.02355) is MEMIT with one change: the update of
an MLP output projection is confined to the null space of the keys of the knowledge
that must be preserved, so those keys are mapped exactly as before.

Conventions (the whole module):
    keys       (n, d_in)      one key per *row* (the paper writes K as d_in x n columns)
    residuals  (n, d_out)     the value change wanted for each key, row i for keys[i]
    delta      (d_out, d_in)  the update, in the orientation of an nn.Linear weight;
                              callers transpose it for GPT-2's Conv1D and cast it to the
                              weight's dtype
    C0         (d_in, d_in)   E[k k^T] over a general corpus (uncentred second moment)
    C_p        (d_in, d_in)   running sum of k k^T over the keys of earlier edit batches

With K1 = keys, R = residuals, P = U U^T the projector onto the null space of C0
(U = eigenvectors of C0 with eigenvalue < threshold, d_in x r) and lambda = l2:

    projector form (the reference code):
        delta^T = solve(P (K1^T K1 + C_p) + lambda I,  P K1^T R)              (d_in, d_out)
    subspace form (equivalent, r x r and symmetric positive definite):
        Y       = (U^T (K1^T K1 + C_p) U + lambda I_r)^-1 U^T K1^T R          (r, d_out)
        delta^T = U Y

The leakage penalty (BetaEdit) adds lambda1 tr(delta P C0 P delta^T), the mean squared change of
the preserved keys' outputs, to the objective: lambda1 C0 joins C_p in both forms, and in the
subspace form it is U^T (lambda1 C0) U = lambda1 diag(s) when U are C0's eigenvectors (s their
eigenvalues), so the r x r system only gains a diagonal.

Because lambda > 0 both solutions lie in the range of P, so delta @ k0 = 0 for every key
k0 in the preserved span: that is AlphaEdit's guarantee. MEMIT, the baseline, solves
delta^T = solve(lambda_m C0 + C_p + K1^T K1, K1^T R) and gives no such guarantee.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

# -----------------------------------------------------------------------------
# shape checks: every public function validates its inputs with messages that name
# the argument and the shapes, because a transposed key matrix is the most common bug


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_2d(name: str, t: Any, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got shape {_shape(t)}")


def _check_keys_residuals(keys: torch.Tensor, residuals: torch.Tensor) -> None:
    _check_2d("keys", keys, "(n, d_in)")
    _check_2d("residuals", residuals, "(n, d_out)")
    if keys.shape[0] != residuals.shape[0]:
        raise ValueError(
            f"keys and residuals must have the same number of rows n (one residual per key): "
            f"keys {_shape(keys)}, residuals {_shape(residuals)}"
        )


def _check_square(name: str, t: Any, d: int, what: str = "(d_in, d_in)") -> None:
    _check_2d(name, t, what)
    if _shape(t) != (d, d):
        raise ValueError(f"{name} must be {what} = {(d, d)}, got shape {_shape(t)}")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The promoted floating dtype of the inputs, at least float32 (half precision is
    not accurate enough for a d_in x d_in solve)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _symmetric_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive definite A via Cholesky (half the work of LU
    and better conditioned); fall back to a general solve if A is not numerically SPD."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


# -----------------------------------------------------------------------------
# preserved-knowledge statistics


class KeyMoments:
    """Running sum of k k^T over key rows, i.e. the uncentred second moment E[k k^T].

    Keys may arrive in any float dtype (bf16 activations, say); they are cast to the
    accumulation dtype (float32 by default, as in the paper) *before* the matmul, so
    the sum over millions of tokens does not lose precision. Only the sum and the count
    are kept, so partial statistics from several processes combine exactly with merge().
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device=None):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=dtype, device=device)  # (dim, dim)
        self.count = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.sum.dtype

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def add(self, keys: torch.Tensor) -> "KeyMoments":
        """Accumulate keys (n, dim); they are moved to this instance's device."""
        _check_2d("keys", keys, f"(n, dim={self.dim})")
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, dim={self.dim}), got shape {_shape(keys)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must have a floating dtype, got {keys.dtype}")
        k = keys.detach().to(device=self.sum.device, dtype=self.sum.dtype)  # (n, dim)
        self.sum.addmm_(k.T, k)  # (dim, dim) += (dim, n) @ (n, dim)
        self.count += int(k.shape[0])
        return self

    def merge(self, other: "KeyMoments") -> "KeyMoments":
        """Add another instance's sum and count into this one, in place; returns self."""
        if not isinstance(other, KeyMoments):
            raise TypeError(f"can only merge a KeyMoments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge KeyMoments of dim {other.dim} into KeyMoments of dim {self.dim}")
        self.sum.add_(other.sum.to(device=self.sum.device, dtype=self.sum.dtype))
        self.count += int(other.count)
        return self

    def mean(self) -> torch.Tensor:
        """C0 = sum / count, (dim, dim), in the accumulation dtype."""
        if self.count == 0:
            raise ValueError("KeyMoments.mean(): no keys have been added (count == 0)")
        return self.sum / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"sum": (dim, dim), "count": int64 scalar}. Like nn.Module.state_dict, "sum" is
        the live tensor, not a copy (it can be gigabytes): clone it if you keep adding."""
        return {"sum": self.sum, "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "KeyMoments":
        """Rebuild from state_dict(); dim, dtype and device come from d["sum"] (copied)."""
        s = d["sum"]
        _check_2d('state_dict["sum"]', s, "(dim, dim)")
        if s.shape[0] != s.shape[1]:
            raise ValueError(f'state_dict["sum"] must be square (dim, dim), got shape {_shape(s)}')
        count = int(d["count"])
        if count < 0:
            raise ValueError(f'state_dict["count"] must be >= 0, got {count}')
        m = cls(int(s.shape[0]), dtype=s.dtype, device=s.device)
        m.sum.copy_(s)
        m.count = count
        return m

    def to(self, device) -> "KeyMoments":
        """Move the sum to device, in place (like nn.Module.to); returns self."""
        self.sum = self.sum.to(device)
        return self

    def __repr__(self) -> str:
        return f"KeyMoments(dim={self.dim}, count={self.count}, dtype={self.dtype}, device={self.device})"


# -----------------------------------------------------------------------------
# the null space of the preserved keys


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class NullSpace:
    """Eigenvectors of C0 whose eigenvalue is below `threshold`: directions the preserved
    keys (almost) never use, so an update confined to them leaves those keys' outputs
    unchanged.

    basis       (d_in, r)  orthonormal columns, ordered by ascending eigenvalue
    eigenvalues (d_in,)    all eigenvalues of C0, ascending (the first r were kept)
    threshold   the selection rule's parameter
    rule        the selection rule (`NULL_SPACE_RULES`)
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    threshold: float
    rule: str = "absolute"

    def __post_init__(self):
        _check_2d("basis", self.basis, "(d_in, r)")
        if self.eigenvalues.dim() != 1 or self.eigenvalues.shape[0] != self.basis.shape[0]:
            raise ValueError(
                f"eigenvalues must be (d_in,) = ({self.basis.shape[0]},) to match basis "
                f"{_shape(self.basis)}, got shape {_shape(self.eigenvalues)}"
            )

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def projector(self) -> torch.Tensor:
        """P = U U^T (d_in, d_in): symmetric, idempotent, of rank r."""
        return self.basis @ self.basis.T  # (d_in, r) @ (r, d_in)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "NullSpace":
        """A copy on another device and/or dtype (the dataclass is frozen)."""
        return NullSpace(
            basis=self.basis.to(device=device, dtype=dtype),
            eigenvalues=self.eigenvalues.to(device=device, dtype=dtype),
            threshold=self.threshold,
            rule=self.rule,
        )


NULL_SPACE_RULES = ("absolute", "relative", "energy", "fraction")
"""How `null_space` picks the kept directions from C0's ascending eigenvalues λ_1 <= ... <= λ_d,
with parameter t:

- ``absolute``: λ_i < t (the reference; depends on the keys' scale);
- ``relative``: λ_i < t · λ_d, a threshold relative to the largest eigenvalue;
- ``energy``: the most smallest-eigenvalue directions whose eigenvalues sum to at most
  t · Σ λ, a fraction of the keys' total variance (0 < t <= 1);
- ``fraction``: the floor(t · d) smallest-eigenvalue directions (0 < t <= 1).
"""


def default_threshold(rule: str) -> float:
    """The parameter a rule takes when none is given: the reference's 2e-2 for ``absolute``; for
    the others, the value that keeps about as many directions as 2e-2 does on SmolLM2-135M's
    layers 4-8 (61-78 %): ``relative`` 1e-2, ``energy`` 0.3, ``fraction`` 0.7 (README, "Choosing
    the null space")."""
    if rule not in NULL_SPACE_RULES:
        raise ValueError(f"null-space rule must be one of {NULL_SPACE_RULES}, got {rule!r}")
    return {"absolute": 2e-2, "relative": 1e-2, "energy": 0.3, "fraction": 0.7}[rule]


def kept_dimension(eigenvalues: torch.Tensor, rule: str = "absolute", threshold: float | None = None) -> int:
    """How many of the ascending ``eigenvalues`` (d,) the selection ``rule`` keeps (``threshold``
    None: the rule's `default_threshold`)."""
    if threshold is None:
        threshold = default_threshold(rule)  # refuses an unknown rule too
    elif rule not in NULL_SPACE_RULES:
        raise ValueError(f"null-space rule must be one of {NULL_SPACE_RULES}, got {rule!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    if rule in ("energy", "fraction") and threshold > 1:
        raise ValueError(f"the {rule} rule takes a fraction in (0, 1], got {threshold!r}")
    values = eigenvalues.double()
    if rule == "absolute":
        return int((values < threshold).sum())
    if rule == "relative":
        return int((values < threshold * values[-1]).sum())
    if rule == "fraction":
        return int(math.floor(threshold * len(values) + 1e-9))
    energy = values.clamp(min=0).cumsum(0)  # round-off can make tiny eigenvalues negative
    return int((energy <= threshold * energy[-1] * (1 + 1e-12)).sum())


def null_space(second_moment: torch.Tensor, threshold: float | None = 2e-2, rule: str = "absolute") -> NullSpace:
    """Eigen-decompose C0 and keep the eigenvectors the selection ``rule`` picks with parameter
    ``threshold`` (see `NULL_SPACE_RULES`; the default is the reference: eigenvalue < 2e-2;
    None: the rule's `default_threshold`).

    The decomposition runs in float64 whatever the input dtype: a float32 eigh of a
    large, ill-conditioned C0 mixes the small-eigenvalue directions, which are exactly
    the ones kept. C0 is symmetrised first so round-off asymmetry cannot matter.
    basis and eigenvalues are returned in the input's dtype (float32 or float64; any
    other dtype gives float32), on the input's device.
    """
    _check_2d("second_moment", second_moment, "(d_in, d_in)")
    if second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"second_moment must be square (d_in, d_in), got shape {_shape(second_moment)}")
    if not bool(torch.isfinite(second_moment).all()):
        raise ValueError("second_moment contains non-finite values (nan or inf)")
    if threshold is None:
        threshold = default_threshold(rule)  # refuses an unknown rule too
    kept_dimension(torch.ones(1), rule, threshold)  # checks rule and threshold before the eigh

    out_dtype = second_moment.dtype if second_moment.dtype in (torch.float32, torch.float64) else torch.float32
    A = second_moment.detach().to(torch.float64)  # (d_in, d_in)
    A = (A + A.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(A)  # (d_in,) ascending, (d_in, d_in) columns
    r = kept_dimension(eigenvalues, rule, threshold)
    basis = eigenvectors[:, :r]  # (d_in, r): ascending order, so the kept ones come first
    return NullSpace(
        basis=basis.to(out_dtype).contiguous(),
        eigenvalues=eigenvalues.to(out_dtype),
        threshold=float(threshold),
        rule=rule,
    )


def null_space_projector(second_moment: torch.Tensor, threshold: float = 2e-2, rule: str = "absolute") -> torch.Tensor:
    """P = U U^T (d_in, d_in) for U = null_space(second_moment, threshold, rule).basis."""
    return null_space(second_moment, threshold, rule).projector()


# -----------------------------------------------------------------------------
# the sequential-editing cache C_p


def update_cache(cache: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """C_p + K^T K (d_in, d_in), a new tensor. cache=None starts from zeros; the result
    has cache's dtype and device (or, with cache=None, keys' device and dtype, at least
    float32)."""
    _check_2d("keys", keys, "(n, d_in)")
    d_in = keys.shape[1]
    if cache is None:
        cache = torch.zeros(d_in, d_in, dtype=_compute_dtype(keys), device=keys.device)
    _check_square("cache", cache, d_in)
    k = keys.to(device=cache.device, dtype=cache.dtype)  # (n, d_in)
    return cache + k.T @ k  # (d_in, d_in)


def project_cache(cache: torch.Tensor, null_space: NullSpace) -> torch.Tensor:
    """U^T C_p U (r, r): all of C_p the subspace form needs, r^2 instead of d_in^2 numbers.
    Computed in the promoted dtype of cache and basis (at least float32), on cache's device."""
    if not isinstance(null_space, NullSpace):
        raise TypeError(f"null_space must be a NullSpace, got {type(null_space).__name__}")
    _check_square("cache", cache, null_space.dim)
    dtype = _compute_dtype(cache, null_space.basis)
    U = null_space.basis.to(device=cache.device, dtype=dtype)  # (d_in, r)
    return U.T @ cache.to(dtype) @ U  # (r, d_in) @ (d_in, d_in) @ (d_in, r)


def leakage_in_subspace(null_space: NullSpace, leakage_weight: float, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """lambda1 U^T C0 U (r, r): the leakage penalty in the coordinates of the subspace solve.

    With ``second_moment`` None the basis must be C0's own eigenvectors, and the result is the
    exact lambda1 diag(s) of their eigenvalues. After a projector refresh the basis is another
    matrix's: pass C0 (d_in, d_in) and U^T C0 U is computed (float64, returned in the basis'
    dtype, on its device)."""
    if not (isinstance(leakage_weight, (int, float)) and not isinstance(leakage_weight, bool)
            and math.isfinite(leakage_weight) and leakage_weight >= 0):
        raise ValueError(f"leakage_weight must be a finite number >= 0, got {leakage_weight!r}")
    U = null_space.basis
    if second_moment is None:
        return torch.diag(leakage_weight * null_space.eigenvalues[: null_space.rank]).to(U)  # (r, r)
    _check_square("second_moment", second_moment, null_space.dim)
    U64 = U.to(torch.float64)
    C0 = second_moment.to(device=U.device, dtype=torch.float64)
    projected = U64.T @ C0 @ U64  # (r, d_in) @ (d_in, d_in) @ (d_in, r)
    return (leakage_weight * (projected + projected.T) / 2).to(U.dtype)


def blended_moment(edit_moment_sum: torch.Tensor, edits: int, second_moment: torch.Tensor, leakage_weight: float) -> torch.Tensor:
    """M = (C_p / n + lambda1 C0) / (lambda1 + 1) (d_in, d_in) in float64: the matrix a projector
    refresh takes the null space of, so that directions the edits themselves used (C_p, the
    edit keys' sum over n edits) leave the null space as well as the preserved ones."""
    _check_2d("edit_moment_sum", edit_moment_sum, "(d_in, d_in)")
    _check_square("second_moment", second_moment, edit_moment_sum.shape[0])
    if edits < 1:
        raise ValueError(f"a refresh needs at least one edit, got edits={edits}")
    Cp = edit_moment_sum.to(torch.float64)
    C0 = second_moment.to(device=Cp.device, dtype=torch.float64)
    return (Cp / edits + leakage_weight * C0) / (leakage_weight + 1)  # (d_in, d_in)


# -----------------------------------------------------------------------------
# the updates


def alphaedit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector_or_null_space: torch.Tensor | NullSpace,
    cache: torch.Tensor | None = None,
    l2: float = 10.0,
    *,
    cache_in_subspace: bool | None = None,
    compute_dtype: torch.dtype | None = None,
    leakage: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlphaEdit's update delta (d_out, d_in) for keys (n, d_in) and residuals (n, d_out).

    Given a projector P (d_in, d_in) tensor, this is the reference code's solve
        delta^T = solve(P (K^T K + C_p) + l2 I, P K^T R).
    Given a NullSpace with basis U (d_in, r), the equivalent, smaller, symmetric solve
        delta^T = U (U^T (K^T K + C_p) U + l2 I_r)^-1 U^T K^T R,
    and a rank-0 null space gives a zero delta (nothing may change).

    cache is C_p, the running sum of k k^T of earlier batches (None = zeros). In the
    projector form it must be (d_in, d_in). In the subspace form it may be the full C_p
    (d_in, d_in) or the projected U^T C_p U (r, r), told apart by shape; when r == d_in
    both shapes coincide and a (d_in, d_in) cache is taken as the FULL C_p. Pass
    cache_in_subspace=True/False to say which it is explicitly (the shape is then checked).

    leakage is the leakage penalty, added beside C_p: lambda1 C0 (d_in, d_in) in the projector
    form, lambda1 U^T C0 U (r, r) in the subspace form (`leakage_in_subspace`). None = none.

    Computed in compute_dtype (None = the promoted dtype of the inputs, at least float32)
    on keys' device (other inputs are moved there). The result stays in that dtype:
    callers cast it to the weight's dtype.
    """
    _check_keys_residuals(keys, residuals)
    if not (isinstance(l2, (int, float)) and not isinstance(l2, bool) and math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a finite number > 0 (it keeps the solve regular), got {l2!r}")
    d_in = keys.shape[1]
    device = keys.device

    if isinstance(projector_or_null_space, NullSpace):
        ns = projector_or_null_space
        if ns.dim != d_in:
            raise ValueError(
                f"null space basis must be (d_in, r) with d_in = {d_in} to match keys {_shape(keys)}, "
                f"got basis {_shape(ns.basis)}"
            )
        if leakage is not None:
            _check_square("leakage", leakage, ns.rank, "(r, r) in the subspace form")
        return _alphaedit_delta_subspace(keys, residuals, ns, cache, l2, cache_in_subspace, compute_dtype, leakage)

    P = projector_or_null_space
    _check_square("projector", P, d_in)
    if cache is not None:
        _check_square("cache", cache, d_in, "(d_in, d_in) in the projector form")
    if cache_in_subspace:
        raise ValueError("cache_in_subspace=True needs a NullSpace, not a projector tensor")
    if leakage is not None:
        _check_square("leakage", leakage, d_in, "(d_in, d_in) in the projector form")

    dtype = compute_dtype or _compute_dtype(keys, residuals, P, cache)
    K = keys.to(device=device, dtype=dtype)  # (n, d_in)
    R = residuals.to(device=device, dtype=dtype)  # (n, d_out)
    P = P.to(device=device, dtype=dtype)  # (d_in, d_in)
    KK = K.T @ K  # (d_in, d_in)
    if cache is not None:
        KK = KK + cache.to(device=device, dtype=dtype)
    if leakage is not None:
        KK = KK + leakage.to(device=device, dtype=dtype)
    I = torch.eye(d_in, dtype=dtype, device=device)
    A = P @ KK + l2 * I  # (d_in, d_in), not symmetric: general solve, as the reference
    B = P @ (K.T @ R)  # (d_in, d_out)
    delta_T = torch.linalg.solve(A, B)  # (d_in, d_out)
    return delta_T.T.contiguous()  # (d_out, d_in)


def _alphaedit_delta_subspace(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    ns: NullSpace,
    cache: torch.Tensor | None,
    l2: float,
    cache_in_subspace: bool | None,
    compute_dtype: torch.dtype | None,
    leakage: torch.Tensor | None = None,
) -> torch.Tensor:
    """The subspace form of alphaedit_delta (inputs already validated against keys)."""
    d_in, d_out, r = keys.shape[1], residuals.shape[1], ns.rank
    device = keys.device

    # decide what the cache is before anything else, so bad shapes fail even when r == 0
    if cache is not None:
        _check_2d("cache", cache, f"(d_in, d_in) = {(d_in, d_in)} or (r, r) = {(r, r)}")
        shape = _shape(cache)
        if cache_in_subspace is None:
            if shape == (d_in, d_in):
                cache_in_subspace = False  # full C_p wins when r == d_in
            elif shape == (r, r):
                cache_in_subspace = True
            else:
                raise ValueError(
                    f"cache must be the full C_p (d_in, d_in) = {(d_in, d_in)} or the projected "
                    f"U^T C_p U (r, r) = {(r, r)}, got shape {shape}"
                )
        elif cache_in_subspace and shape != (r, r):
            raise ValueError(f"cache_in_subspace=True needs cache (r, r) = {(r, r)}, got shape {shape}")
        elif not cache_in_subspace and shape != (d_in, d_in):
            raise ValueError(f"cache_in_subspace=False needs cache (d_in, d_in) = {(d_in, d_in)}, got shape {shape}")

    dtype = compute_dtype or _compute_dtype(keys, residuals, ns.basis, cache)
    if r == 0:
        return torch.zeros(d_out, d_in, dtype=dtype, device=device)  # no free direction

    U = ns.basis.to(device=device, dtype=dtype)  # (d_in, r)
    KU = keys.to(device=device, dtype=dtype) @ U  # (n, r): keys in null-space coordinates
    R = residuals.to(device=device, dtype=dtype)  # (n, d_out)
    A = KU.T @ KU  # (r, r)
    if cache is not None:
        C = cache.to(device=device, dtype=dtype)
        A = A + (C if cache_in_subspace else U.T @ C @ U)  # (r, r)
    if leakage is not None:
        A = A + leakage.to(device=device, dtype=dtype)  # (r, r)
    A = (A + A.T) / 2 + l2 * torch.eye(r, dtype=dtype, device=device)  # (r, r), SPD
    B = KU.T @ R  # (r, d_out)
    Y = _symmetric_solve(A, B)  # (r, d_out)
    return (U @ Y).T.contiguous()  # (d_in, r) @ (r, d_out) -> transposed (d_out, d_in)


def memit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    second_moment: torch.Tensor,
    cache: torch.Tensor | None = None,
    mom2_weight: float = 15000.0,
) -> torch.Tensor:
    """MEMIT's update (the baseline, no projection), in float64 as the reference code:
        delta^T = solve(mom2_weight C0 + C_p + K^T K, K^T R)          (d_in, d_out)
    Returns delta (d_out, d_in) in float64 on keys' device; callers cast it. The
    mom2_weight C0 term only *discourages* changes along preserved keys, it does not
    forbid them: that is the difference AlphaEdit makes.
    """
    _check_keys_residuals(keys, residuals)
    d_in = keys.shape[1]
    _check_square("second_moment", second_moment, d_in)
    if cache is not None:
        _check_square("cache", cache, d_in)
    if not (isinstance(mom2_weight, (int, float)) and not isinstance(mom2_weight, bool)
            and math.isfinite(mom2_weight) and mom2_weight >= 0):
        raise ValueError(f"mom2_weight must be a finite number >= 0, got {mom2_weight!r}")

    device, dtype = keys.device, torch.float64
    K = keys.to(device=device, dtype=dtype)  # (n, d_in)
    R = residuals.to(device=device, dtype=dtype)  # (n, d_out)
    A = mom2_weight * second_moment.to(device=device, dtype=dtype) + K.T @ K  # (d_in, d_in)
    if cache is not None:
        A = A + cache.to(device=device, dtype=dtype)
    A = (A + A.T) / 2
    delta_T = _symmetric_solve(A, K.T @ R)  # (d_in, d_out)
    return delta_T.T.contiguous()  # (d_out, d_in)


# -----------------------------------------------------------------------------
# the other methods of the paper's comparison: each a small transformation of an update


def project_update(delta: torch.Tensor, null_space: NullSpace) -> torch.Tensor:
    """delta P = (delta U) U^T (d_out, d_in): the "+AlphaEdit" plug-in of the paper's Figure 6,
    an update of any method confined to the null space of the preserved keys, so that
    (delta P) k0 = 0 for every k0 in the preserved span. Computed in the promoted dtype."""
    _check_2d("delta", delta, "(d_out, d_in)")
    if not isinstance(null_space, NullSpace):
        raise TypeError(f"null_space must be a NullSpace, got {type(null_space).__name__}")
    if delta.shape[1] != null_space.dim:
        raise ValueError(f"delta must be (d_out, d_in) with d_in = {null_space.dim}, got shape {_shape(delta)}")
    dtype = _compute_dtype(delta, null_space.basis)
    U = null_space.basis.to(device=delta.device, dtype=dtype)  # (d_in, r)
    return (delta.to(dtype) @ U) @ U.T  # (d_out, r) @ (r, d_in): never forms the d_in x d_in P


def restrain_singular_values(accumulated: torch.Tensor, sigma: float) -> torch.Tensor:
    """PRUNE (Ma et al., 2024): the accumulated edit ΔW = U diag(s) V^T with every singular value
    s >= sigma (the largest singular value of the unedited W) replaced by log(s) + sigma - log(sigma),
    so the edited matrix's condition number cannot grow without bound. The map is continuous and
    increasing at s = sigma and keeps U and V, so the row space of ΔW (and with it a null-space
    confinement) is kept. Computed in float64, returned in the input's dtype."""
    _check_2d("accumulated", accumulated, "(d_out, d_in)")
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (the unedited weight's largest singular value), got {sigma!r}")
    A = accumulated.to(torch.float64)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
    large = s >= sigma
    if not bool(large.any()):
        return accumulated.clone()
    restrained = torch.where(large, torch.log(s.clamp(min=sigma)) + sigma - math.log(sigma), s)  # (m,)
    return ((U * restrained) @ Vh).to(accumulated.dtype)  # (d_out, d_in)


def keep_largest_relative_change(delta: torch.Tensor, weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """RECT (Gu et al., EMNLP 2024): keep the round(fraction * numel) entries of delta with the
    largest relative change |delta_ij| / |W_ij| and set the others to zero. An entry whose
    weight is 0 has an infinite relative change when delta_ij != 0 (kept first). Ties are broken
    by position (stable), so the result is deterministic. weight (d_out, d_in) like delta."""
    _check_2d("delta", delta, "(d_out, d_in)")
    if weight.shape != delta.shape:
        raise ValueError(f"weight must have delta's shape {_shape(delta)} (d_out, d_in), got {_shape(weight)}")
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    magnitude = delta.abs().double()
    relative = magnitude / weight.to(device=delta.device).abs().double()  # inf where W = 0 and delta != 0
    relative = torch.nan_to_num(relative, nan=0.0)  # 0 / 0: nothing changes there
    keep = max(1, round(fraction * delta.numel()))
    order = torch.sort(relative.flatten(), descending=True, stable=True).indices[:keep]
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[order] = True
    return delta * mask.view_as(delta)


def clamp_to_ball(change: torch.Tensor, radius: float) -> torch.Tensor:
    """The FT-L constraint (ROME's constrained fine-tuning baseline): every entry of a weight
    change clamped to [-radius, radius], the L-infinity ball around the weights before the edit."""
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    return change.clamp(-radius, radius)
