"""Library + STLSQ fit time: lgfjax (jitted, float64) against pysindy on the same data.

Two sizes from the LGF setting, each on a damped, rotating linear-flow trajectory (as
heavy-ball iterates on a quadratic look):

- K = 50 samples of r = 8 variables (POD coordinates), degree 2: P = 45 terms;
- K = 15 samples of n = 225 variables, degree 2: 13 central-difference rows and
  P = 25,651 terms, so lgfjax takes the dual (kernel) path.

Both sides fit the same thing: the degree-2 polynomial library of the trajectory and
STLSQ (threshold, alpha, max_iter=20, unbiased) against the same central-difference
targets. For n = 225 the ridge solution spreads over 25,651 terms, so threshold 0.1
drops every term after one fit; threshold 1e-3 keeps thousands and iterates.
pysindy's time is ``PolynomialLibrary().fit_transform`` plus ``STLSQ().fit``; lgfjax's
is one jitted function doing library, strong form and STLSQ, timed after compilation
with ``block_until_ready``. Medians of several repeats; the machine may
be shared, so read the ratio, not the absolute times.

    python benchmarks/bench_stlsq.py [--repeats 5]
"""

import argparse
import functools
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pysindy as ps  # noqa: E402
import scipy.linalg  # noqa: E402

import lgfjax  # noqa: E402

ALPHA = 0.05
MAX_ITER = 20


def linear_flow_trajectory(n, num, dt, seed=0):
    """``num`` samples, ``dt`` apart, of ``x' = (-H + S) x``: H symmetric with eigenvalues
    in [0.1, 1], S skew. A damped, rotating linear flow, like heavy-ball iterates on a
    quadratic; the true model is linear, so the degree-2 terms should go.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    h = q @ np.diag(np.logspace(-1, 0, n)) @ q.T
    s = rng.normal(size=(n, n))
    s = (s - s.T) / np.sqrt(n)
    step = scipy.linalg.expm(dt * (s - h))
    x = np.empty((num, n))
    x[0] = rng.normal(size=n)
    for k in range(1, num):
        x[k] = step @ x[k - 1]
    return x


@functools.partial(jax.jit, static_argnames=("degree",))
def lgfjax_fit(x, dt, threshold, degree):
    theta = lgfjax.polynomial_library(x, degree)
    target, features = lgfjax.strong_form(x, theta, dt, 2)
    return lgfjax.stlsq(features, target, threshold=threshold, alpha=ALPHA, max_iter=MAX_ITER)


def pysindy_fit(x, dt, threshold, degree):
    lib = ps.PolynomialLibrary(degree=degree)
    theta = np.asarray(lib.fit_transform(x))
    target = 0.5 * (x[2:] - x[:-2]) / dt
    opt = ps.STLSQ(threshold=threshold, alpha=ALPHA, max_iter=MAX_ITER, unbias=True)
    opt.fit(theta[1:-1], target)
    return opt.coef_.T, len(opt.history_)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_case(label, n, num, dt, threshold, repeats):
    x_np = linear_flow_trajectory(n, num, dt)
    x = jnp.asarray(x_np)
    size = lgfjax.library_size(n, 2)
    fit = lambda: lgfjax_fit(x, dt, threshold, 2).block_until_ready()

    start = time.perf_counter()
    coef = np.asarray(fit())
    compile_time = time.perf_counter() - start
    t_lgf = median_time(fit, repeats)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, fits = pysindy_fit(x_np, dt, threshold, 2)
        t_ps = median_time(lambda: pysindy_fit(x_np, dt, threshold, 2), max(1, repeats // 2))

    same_support = np.array_equal(coef != 0, ref != 0)
    # On numerically rank-deficient supports the refit is not unique; compare residuals.
    theta = np.asarray(lgfjax.polynomial_library(x, 2))[1:-1]
    target = 0.5 * (x_np[2:] - x_np[:-2]) / dt
    res_lgf = np.linalg.norm(theta @ coef - target)
    res_ps = np.linalg.norm(theta @ ref - target)
    print(
        f"{label:<24} {threshold:>6g} {num - 2:>4} {size:>6} {fits:>4} "
        f"{t_lgf * 1e3:>10.1f} {t_ps * 1e3:>11.1f} {t_ps / t_lgf:>7.1f}x {compile_time:>8.1f}  "
        f"nnz {np.count_nonzero(coef)}/{coef.size}, same support {same_support}, "
        f"max |diff| {np.max(np.abs(coef - ref)):.1e}, "
        f"residual {res_lgf:.2e} vs {res_ps:.2e}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        "library + STLSQ fit, float64, jitted lgfjax vs pysindy PolynomialLibrary.fit_transform"
        f" + STLSQ.fit (alpha={ALPHA}, max_iter={MAX_ITER}, unbias); median of repeats"
    )
    print(
        f"{'case':<24} {'thresh':>6} {'rows':>4} {'P':>6} {'fits':>4} {'lgfjax ms':>10} "
        f"{'pysindy ms':>11} {'ratio':>8} {'compile':>8}  check"
    )
    run_case("K=50, r=8 (primal)", 8, 50, 0.1, 0.1, args.repeats)
    run_case("K=15, n=225 (dual)", 225, 15, 0.1, 0.1, args.repeats)
    run_case("K=15, n=225 (dual)", 225, 15, 0.1, 1e-3, args.repeats)
    print(
        "fits = ridge fits pysindy made (len(history_)); ratio = pysindy / lgfjax "
        "(> 1: lgfjax faster); compile = first call in s;"
        " check: lgfjax vs pysindy coefficients, and each fit's residual norm"
    )


if __name__ == "__main__":
    main()
