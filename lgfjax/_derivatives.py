"""Regression targets for the time derivative of a sampled trajectory.

Both forms return a pair ``(target, features)`` such that the flow coefficients solve
``target ~ features @ coefficients``: the strong form by finite differences, the weak
form by integrating against compactly supported test functions.
"""

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Rows of the trajectory lost at each end, per finite-difference order (forward for 1).
FD_ORDERS = {1: (0, 1), 2: (1, 1), 4: (2, 2)}


def finite_difference(x: Float[Array, "K n"], dt, order: int = 2) -> Float[Array, "K_valid n"]:
    """Time derivative of a uniformly sampled trajectory by finite differences.

    **Arguments:**

    - `x`: the trajectory, one sample per row, sampled at ``t_k = k * dt``.
    - `dt`: the sample spacing.
    - `order`: 1 (forward), 2 (central) or 4 (central, five points).

    **Returns:** derivative estimates at rows ``lo .. K - hi - 1`` where ``(lo, hi) =
    FD_ORDERS[order]``.
    """
    if order == 1:
        d = x[1:] - x[:-1]
    elif order == 2:
        d = 0.5 * (x[2:] - x[:-2])
    elif order == 4:
        d = (x[:-4] - 8.0 * x[1:-3] + 8.0 * x[3:-1] - x[4:]) / 12.0
    else:
        raise ValueError(f"`fd_order` must be one of (1, 2, 4), got {order!r}.")
    return d / dt


def strong_form(
    x: Float[Array, "K n"], theta: Float[Array, "K P"], dt, order: int = 2
) -> tuple[Float[Array, "K_valid n"], Float[Array, "K_valid P"]]:
    """Finite-difference targets and the matching rows of the library matrix."""
    lo, hi = FD_ORDERS.get(order, (0, 0))
    target = finite_difference(x, dt, order)
    return target, theta[lo : theta.shape[0] - hi]


def default_weak_width(num_points: int) -> int:
    """Default support (in samples) of each weak-form test function: half the history.

    Wide supports keep short histories (15 to 30 samples) well posed: each test
    function averages over many samples instead of differencing two or three.
    """
    return max(4, (num_points + 1) // 2)


@functools.lru_cache(maxsize=64)
def test_functions(
    num_points: int, width: int, power: int = 4, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial bump test functions on a uniform grid, in units where ``dt = 1``.

    Each bump is ``(s (L - 1 - s))^power`` on ``s = 0 .. L - 1`` (``L = width``), scaled
    to peak 1, zero at both ends of its support; bumps start every ``stride`` samples.

    **Returns:** ``(phi, dphi)``, each of shape ``(J, num_points)``.
    """
    # A 3-sample bump has a zero derivative at every sample: the target would vanish.
    if not 4 <= width <= num_points:
        raise ValueError(
            f"`weak_width` must be in [4, {num_points}] for {num_points} samples, got {width!r}."
        )
    s = np.arange(width, dtype=np.float64)
    half = (width - 1) / 2.0
    bump = (s * (width - 1 - s)) ** power
    dbump = power * (s * (width - 1 - s)) ** (power - 1) * (width - 1 - 2 * s)
    scale = (half * half) ** power
    starts = range(0, num_points - width + 1, stride)
    phi = np.zeros((len(starts), num_points))
    dphi = np.zeros((len(starts), num_points))
    for j, start in enumerate(starts):
        phi[j, start : start + width] = bump / scale
        dphi[j, start : start + width] = dbump / scale
    return phi, dphi


def weak_form(
    x: Float[Array, "K n"],
    theta: Float[Array, "K P"],
    dt,
    *,
    width: int | None = None,
    power: int = 4,
    stride: int = 1,
) -> tuple[Float[Array, "J n"], Float[Array, "J P"]]:
    """Weak-form targets: ``-int phi_j' x dt ~ (int phi_j theta dt) @ coefficients``.

    Integration by parts moves the time derivative onto the test functions, so no
    finite difference of the data is taken. Integrals use the trapezoid rule, which
    reduces to a plain sum because every bump vanishes at the ends of its support.

    **Arguments:**

    - `x`, `theta`: trajectory and library rows sampled at ``t_k = k * dt``.
    - `dt`: sample spacing.
    - `width`: samples in each test function's support; default
      ``default_weak_width(K)``.
    - `power`: polynomial power of each bump.
    - `stride`: samples between consecutive bumps.
    """
    num_points = x.shape[0]
    width = default_weak_width(num_points) if width is None else width
    phi, dphi = test_functions(num_points, width, power, stride)
    phi = jnp.asarray(phi, theta.dtype)
    dphi = jnp.asarray(dphi, x.dtype)
    # In index units d/dt = (1/dt) d/ds and dt cancels from the target.
    target = -(dphi @ x)
    features = dt * (phi @ theta)
    return target, features
