"""The option objects: a schedule (`Verified`, `Fixed`), the fit (`Fit`) and the
integrator (`Integrator`), passed to `lgf` and `lgf_adam` as ``schedule=``, ``fit=``
and ``integrator=``, as optimistix passes ``search=`` and diffrax ``solver=``.

Each checks its own fields when it is built (a `ValueError` naming the field, its
value and the allowed range); the front ends check what spans two objects (a POD
rank against the schedule's history, say). `from_keywords` turns the flat keywords
of earlier releases into these objects, with a `DeprecationWarning` that shows the
new spelling.
"""

import warnings
from typing import Literal

import diffrax
import equinox as eqx

from ._derivatives import FD_ORDERS
from ._flow import RK4
from ._validate import (
    _concrete,
    check_bool,
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_static,
)


def _check_optional_int(name, value, minimum=1):
    if value is not None:
        check_positive_int(name, value, minimum)


def _check_optional_bool(name, value):
    if value is not None:
        check_bool(name, value)


class Verified(eqx.Module):
    """The verified schedule (the default): each surrogate phase is judged by the true
    step after it, for free, and lengthened, shortened or undone by that verdict.

    **Arguments:**

    - `history_size`: K, the number of recent true steps the flow is fitted to
      (``>= 3``; `lgf_adam` needs ``>= 2`` pairs, but the same floor applies).
    - `tolerance`: the largest relative error ``|predicted - measured| / |measured|``
      of the flow at the judging true step that counts as agreement, in [0, 1)
      (0.2: direction within about 11.5 degrees, speed within 20 %). Under noisy
      gradients it is widened by the measured noise (see the guide's "Stochastic
      gradients").
    - `max_surrogate_steps`: the longest phase (default ``50 K``).
    - `max_horizon`: the longest time one surrogate step integrates, in units of
      `dt` (a power of two; 1 keeps every step at `dt`). A confirmed phase of at
      least ``4 K`` steps doubles the horizon, any failure halves it.
    """

    history_size: int = 10
    tolerance: float = 0.2
    max_surrogate_steps: int | None = None
    max_horizon: int = 8

    def __check_init__(self):
        check_positive_int("history_size", self.history_size, 3)
        check_nonnegative("tolerance", self.tolerance)
        if _concrete(self.tolerance) and not float(self.tolerance) < 1.0:
            raise ValueError(f"`tolerance` must be a number in [0, 1), got {self.tolerance!r}.")
        _check_optional_int("max_surrogate_steps", self.max_surrogate_steps)
        h = self.max_horizon
        if not (isinstance(h, int) and not isinstance(h, bool) and h >= 1 and h & (h - 1) == 0):
            raise ValueError(
                f"`max_horizon` must be a power of two >= 1 (surrogate steps of up to that "
                f"many `dt`), got {h!r}."
            )


class Fixed(eqx.Module):
    """The paper's fixed schedule: every cycle of `retrain_interval` (M) updates takes
    `history_size` (K) true steps, fits, and integrates the flow for the other M - K.

    **Arguments:**

    - `history_size`: K, true steps recorded per cycle.
    - `retrain_interval`: M, updates per cycle (``>= K``).
    - `derivative`: the fitted targets of `lgfjax.lgf`: ``"strong"`` (finite
      differences of order `fd_order` in {1, 2, 4}) or ``"weak"`` (test functions of
      `weak_width` samples, power `weak_power`). `lgf_adam` records gradients and
      ignores these four.
    - `check_every`, `check_tolerance`: check the loss through the extra argument
      `value_fn` every `check_every` surrogate steps and at the end of the phase (no
      gradient); a check passes when ``loss <= reference + check_tolerance
      * |reference|``, and a rise rolls back to the last accepted point.
    - `adaptive`: double the surrogate phase after a cycle with no fallback, halve it
      after one with, between 1 and `max_surrogate_steps` (default ``4 (M - K)``).
    """

    history_size: int
    retrain_interval: int
    derivative: Literal["strong", "weak"] = "strong"
    fd_order: int = 2
    weak_width: int | None = None
    weak_power: int = 4
    check_every: int | None = None
    check_tolerance: float = 0.0
    adaptive: bool = False
    max_surrogate_steps: int | None = None

    def __check_init__(self):
        check_positive_int("history_size", self.history_size, 2)
        check_positive_int("retrain_interval", self.retrain_interval, self.history_size)
        check_choice("derivative", self.derivative, ("strong", "weak"))
        check_choice("fd_order", self.fd_order, tuple(FD_ORDERS))
        width = self.weak_width
        if width is not None and not (
            isinstance(width, int) and 4 <= width <= self.history_size + 1
        ):
            raise ValueError(
                f"`weak_width` must be None or an integer in [4, history_size + 1="
                f"{self.history_size + 1}], got {width!r}."
            )
        check_positive_int("weak_power", self.weak_power)
        _check_optional_int("check_every", self.check_every)
        check_nonnegative("check_tolerance", self.check_tolerance)
        check_bool("adaptive", self.adaptive)
        _check_optional_int("max_surrogate_steps", self.max_surrogate_steps)


class Fit(eqx.Module):
    """The fit: the polynomial library, the POD subspace and STLSQ.

    **Arguments:**

    - `poly_order`, `include_bias`: the polynomial library.
    - `rank`: POD rank ``1 <= rank <= K``, or None to fit in full parameter space;
      ``"auto"`` (default) is None for the fixed schedule and ``min(n, K // 2)`` for
      the verified one.
    - `center`: (default: True with a rank under the verified schedule, else False)
      take the POD of the iterates minus the last one (the paper's POD is uncentred);
      resolves small moves of large parameters in float32. Keep `include_bias` then.
    - `threshold`, `alpha`, `max_iter`, `normalize_columns`, `unbias`: STLSQ, see
      `lgfjax.stlsq`.
    - `relative_threshold`: (default: True for the verified schedule, False for the
      fixed one) measure `threshold` in units of the targets' typical column norm, so
      the fit does not empty as the iterates slow down near a minimum.
    """

    poly_order: int = 1
    include_bias: bool = True
    rank: int | None | Literal["auto"] = "auto"
    center: bool | None = None
    threshold: float = 1e-8
    relative_threshold: bool | None = None
    alpha: float = 1e-6
    max_iter: int = 20
    normalize_columns: bool = True
    unbias: bool = True

    def __check_init__(self):
        check_positive_int("poly_order", self.poly_order)
        check_bool("include_bias", self.include_bias)
        check_static("rank", self.rank)
        if self.rank not in ("auto", None):
            check_positive_int("rank", self.rank)
        _check_optional_bool("center", self.center)
        check_nonnegative("threshold", self.threshold)
        _check_optional_bool("relative_threshold", self.relative_threshold)
        check_nonnegative("alpha", self.alpha)
        check_positive_int("max_iter", self.max_iter)
        check_bool("normalize_columns", self.normalize_columns)
        check_bool("unbias", self.unbias)


class Integrator(eqx.Module):
    """The diffrax solve of each surrogate step and its trust region.

    **Arguments:**

    - `solver`, `substeps`, `stepsize_controller`, `max_steps`: the diffrax solve of
      each surrogate step (initial step ``dt / substeps``; `max_steps` defaults to
      ``16 substeps``).
    - `max_step_ratio`: the trust region: a surrogate step longer than this times the
      last true step (in parameter space) ends the phase. None for no bound;
      ``"auto"`` is 3 for `lgfjax.lgf` and 10 for `lgfjax.lgf_adam`.
    """

    solver: diffrax.AbstractSolver = RK4()
    substeps: int = 1
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.ConstantStepSize()
    max_steps: int | None = None
    max_step_ratio: float | None | Literal["auto"] = "auto"

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(
                f"`solver` must be a diffrax.AbstractSolver instance such as "
                f"lgfjax.RK4() or diffrax.Tsit5(), got {self.solver!r}."
            )
        check_positive_int("substeps", self.substeps)
        if not isinstance(self.stepsize_controller, diffrax.AbstractStepSizeController):
            raise ValueError(
                "`stepsize_controller` must be a diffrax.AbstractStepSizeController such "
                f"as diffrax.ConstantStepSize(), got {self.stepsize_controller!r}."
            )
        _check_optional_int("max_steps", self.max_steps, self.substeps)
        if self.max_step_ratio not in ("auto", None):
            check_positive("max_step_ratio", self.max_step_ratio)


# Where each flat keyword of earlier releases lives now: (object, field).
_MOVED = {
    "history_size": ("schedule", "history_size"),
    "retrain_interval": ("Fixed", "retrain_interval"),
    "verify_tolerance": ("Verified", "tolerance"),
    "max_horizon": ("Verified", "max_horizon"),
    "max_surrogate_steps": ("schedule", "max_surrogate_steps"),
    **{
        k: ("Fixed", k)
        for k in (
            "derivative",
            "fd_order",
            "weak_width",
            "weak_power",
            "check_every",
            "check_tolerance",
            "adaptive",
        )
    },
    **{k: ("Fit", k) for k in Fit.__dataclass_fields__},
    **{k: ("Integrator", k) for k in Integrator.__dataclass_fields__},
}


def _spell(name, fields):
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"lgfjax.{name}({args})"


def from_keywords(front, schedule, fit, integrator, keywords):
    """``(schedule, fit, integrator)`` with the flat `keywords` of earlier releases
    moved into the objects they belong to (with a `DeprecationWarning`).

    `schedule` may also be the old strings ``"verified"`` or ``"fixed"``. A keyword
    given together with the object it belongs to is a `ValueError`, as is a keyword
    that no object holds (a `TypeError`, as Python raises).
    """
    if "old_keywords" in keywords:  # passed on whole by optax.inject_hyperparams
        keywords = {**keywords.pop("old_keywords"), **keywords}
    unknown = sorted(set(keywords) - set(_MOVED))
    if unknown:
        raise TypeError(f"{front}() got an unexpected keyword argument {unknown[0]!r}")
    named = schedule if isinstance(schedule, str) else None
    if named is not None:
        check_choice("schedule", named, ("verified", "fixed"))
        schedule = None
    if schedule is not None and not isinstance(schedule, (Verified, Fixed)):
        raise ValueError(
            "`schedule` must be lgfjax.Verified(...) or lgfjax.Fixed(history_size, "
            f"retrain_interval, ...), got {schedule!r}."
        )
    for name, value, kind in (("fit", fit, Fit), ("integrator", integrator, Integrator)):
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"`{name}` must be an lgfjax.{kind.__name__}(...), got {value!r}.")
    groups = {"schedule": {}, "Fit": {}, "Integrator": {}}
    for key, value in keywords.items():
        where, field = _MOVED[key]
        groups["schedule" if where in ("Verified", "Fixed") else where][(where, field)] = value
    given = {"schedule": schedule, "Fit": fit, "Integrator": integrator}
    for where, moved in groups.items():
        if moved and given[where] is not None:
            old = ", ".join(f"`{k[1]}`" for k in moved)
            raise ValueError(
                f"{front}: give the options {old} inside `{where.lower()}=` (an "
                f"lgfjax object), not beside it; got both."
            )
    news = []
    if groups["schedule"] or named is not None:
        schedule = _schedule_from(named, groups["schedule"])
        news.append(f"schedule={_spell(type(schedule).__name__, _fields(groups['schedule']))}")
    if groups["Fit"]:
        fit = Fit(**_fields(groups["Fit"]))
        news.append(f"fit={_spell('Fit', _fields(groups['Fit']))}")
    if groups["Integrator"]:
        integrator = Integrator(**_fields(groups["Integrator"]))
        news.append(f"integrator={_spell('Integrator', _fields(groups['Integrator']))}")
    if news:
        warnings.warn(
            f"{front}: the flat keywords {sorted(keywords) or [named]} are deprecated and "
            f"will be removed in the next release; write {', '.join(news)}.",
            DeprecationWarning,
            stacklevel=3,
        )
    return schedule, fit, integrator


def _fields(moved):
    return {field: value for (_, field), value in moved.items()}


def _schedule_from(named, moved):
    fixed_only = {f for (where, f) in moved if where == "Fixed"}
    verified_only = {f for (where, f) in moved if where == "Verified"}
    fixed = named == "fixed" or (named is None and "retrain_interval" in fixed_only)
    fields = _fields(moved)
    if fixed:
        if verified_only:
            name = sorted(verified_only)[0]
            raise ValueError(
                f"`{'verify_tolerance' if name == 'tolerance' else name}` applies to the "
                f"verified schedule only, got it with schedule='fixed'."
            )
        if "history_size" not in fields or "retrain_interval" not in fields:
            raise ValueError(
                "`schedule='fixed'` needs `history_size` and `retrain_interval` (K and M), "
                f"got history_size={fields.get('history_size')!r}, "
                f"retrain_interval={fields.get('retrain_interval')!r}."
            )
        return Fixed(**fields)
    for name in sorted(fixed_only):
        value = fields[name]
        if name == "adaptive" and value is False or name == "check_tolerance" and value == 0:
            del fields[name]  # the old defaults, passed explicitly
            continue
        hint = {
            "retrain_interval": "with schedule='verified' phases follow the verification",
            "check_every": "the verified schedule judges each phase by the loss passed as `value`",
            "adaptive": "the verified schedule sets phase lengths from the verification record",
        }.get(name, "the verified schedule models the base's velocity `update / dt`")
        raise ValueError(f"`{name}` applies to schedule='fixed' ({hint}), got {name}={value!r}.")
    try:
        return Verified(**fields)
    except ValueError as error:  # name the keyword the caller wrote
        raise ValueError(str(error).replace("`tolerance`", "`verify_tolerance`")) from None


def flat_options(schedule, fit, integrator, *, max_step_ratio, derivatives):
    """The flat keywords of `_lgf` / `_lgf_adam` that the option objects stand for.

    `max_step_ratio` is the front end's default trust region (for ``"auto"``);
    `derivatives` says whether the front end takes the fixed schedule's derivative
    options (`lgf_adam` records gradients and has none).
    """
    schedule = Verified() if schedule is None else schedule
    fit = Fit() if fit is None else fit
    integrator = Integrator() if integrator is None else integrator
    flat = {k: getattr(fit, k) for k in Fit.__dataclass_fields__}
    flat.update({k: getattr(integrator, k) for k in Integrator.__dataclass_fields__})
    if flat["max_step_ratio"] == "auto":
        flat["max_step_ratio"] = max_step_ratio
    fields = {k: getattr(schedule, k) for k in type(schedule).__dataclass_fields__}
    if isinstance(schedule, Verified):
        flat.update(
            schedule="verified",
            history_size=fields["history_size"],
            verify_tolerance=fields["tolerance"],
            max_surrogate_steps=fields["max_surrogate_steps"],
            max_horizon=fields["max_horizon"],
        )
        return flat
    derivative = {k: fields.pop(k) for k in ("derivative", "fd_order", "weak_width", "weak_power")}
    if derivatives:
        flat.update(derivative)
    else:
        for name, value in derivative.items():
            if value != Fixed.__dataclass_fields__[name].default:
                raise ValueError(
                    f"`{name}` selects lgfjax.lgf's fitted targets; lgfjax.lgf_adam records "
                    f"its gradients, so leave it at its default, got {name}={value!r}."
                )
    flat.update(schedule="fixed", **fields)
    return flat
