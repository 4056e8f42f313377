"""Construction-time checks that name the offending argument, its value and range."""

import numbers
import warnings

import jax
import numpy as np

# The integer, boolean and choice arguments of `lgf` / `lgf_adam` (see `static_args`).
_STATIC = (
    "base",
    "history_size",
    "retrain_interval",
    "schedule",
    "poly_order",
    "include_bias",
    "rank",
    "center",
    "derivative",
    "fd_order",
    "weak_width",
    "weak_power",
    "relative_threshold",
    "max_iter",
    "normalize_columns",
    "unbias",
    "solver",
    "substeps",
    "stepsize_controller",
    "max_steps",
    "check_every",
    "adaptive",
    "max_surrogate_steps",
    "max_horizon",
    "buffer_dtype",
    "amsgrad",
    "fit",
    "integrator",
    "restore_moments",
    "gradient_basis",
)


_WARNED: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """A `UserWarning`, once per process for each `key`."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)


def _concrete(value) -> bool:
    # Traced hyperparameters (e.g. under optax.inject_hyperparams) cannot be checked.
    return not isinstance(value, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]


def _fail(name, value, allowed):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def static_args(factory) -> tuple[str, ...]:
    """The arguments of `factory` (`lgfjax.lgf` or `lgfjax.lgf_adam`) that must be static.

    The options that fix array shapes or the compiled program live in the option
    objects (`lgfjax.Verified`, `lgfjax.Fixed`, `lgfjax.Fit`, `lgfjax.Integrator`),
    which `optax.inject_hyperparams` leaves alone, so it needs no ``static_args``
    any more; this stays for code written against earlier releases.

    ```python
    import optax, lgfjax

    opt = optax.inject_hyperparams(
        lgfjax.lgf_adam, static_args=lgfjax.static_args(lgfjax.lgf_adam)
    )(learning_rate=1e-2)
    ```
    """
    import inspect

    parameters = inspect.signature(factory).parameters
    return tuple(name for name in _STATIC if name in parameters)


def check_static(name: str, value) -> None:
    """`value` must be a Python value, not an array (it fixes shapes or the program)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        raise ValueError(
            f"`{name}` must be a Python value, not an array: it fixes array shapes or the "
            f"compiled program, got {value!r}. With `optax.inject_hyperparams`, pass "
            "`static_args=lgfjax.static_args(lgfjax.lgf)` (or `lgfjax.lgf_adam`): every "
            "integer, boolean and choice argument."
        )


def check_number(name: str, value) -> None:
    """`value` must be a real number or a (possibly traced) scalar array."""
    if isinstance(value, (bool, str)) or not isinstance(
        value, (numbers.Real, jax.Array, np.ndarray, np.generic)
    ):
        _fail(name, value, "a real number")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    check_static(name, value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def check_nonnegative(name: str, value) -> None:
    check_number(name, value)
    if _concrete(value) and not (float(value) >= 0.0):
        _fail(name, value, "a number >= 0")


def check_positive(name: str, value) -> None:
    check_number(name, value)
    if _concrete(value) and not (float(value) > 0.0):
        _fail(name, value, "a number > 0")


def check_bool(name: str, value) -> None:
    check_static(name, value)
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def check_choice(name: str, value, choices) -> None:
    check_static(name, value)
    if value not in choices:
        _fail(name, value, f"one of {tuple(choices)!r}")
