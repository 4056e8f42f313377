"""Construction-time checks that name the offending argument, its value and range."""

import jax


def _concrete(value) -> bool:
    # Traced hyperparameters (e.g. under optax.inject_hyperparams) cannot be checked.
    return not isinstance(value, jax.core.Tracer)


def _fail(name, value, allowed):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def check_nonnegative(name: str, value) -> None:
    if _concrete(value) and not (float(value) >= 0.0):
        _fail(name, value, "a number >= 0")


def check_positive(name: str, value) -> None:
    if _concrete(value) and not (float(value) > 0.0):
        _fail(name, value, "a number > 0")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        _fail(name, value, f"one of {tuple(choices)!r}")
