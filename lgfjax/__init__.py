"""lgfjax: learned gradient flow (LGF) optimisers for JAX and optax."""

from ._adam import AdamState as AdamState, lgf_adam as lgf_adam
from ._derivatives import (
    finite_difference as finite_difference,
    strong_form as strong_form,
    test_functions as test_functions,
    weak_form as weak_form,
)
from ._fixed import LGFState as LGFState
from ._flow import RK4 as RK4, PolynomialFlow as PolynomialFlow
from ._lgf import lgf as lgf
from ._library import (
    feature_names as feature_names,
    library_size as library_size,
    polynomial_exponents as polynomial_exponents,
    polynomial_library as polynomial_library,
)
from ._newton import (
    NewtonState as NewtonState,
    newton as newton,
    newton_direction as newton_direction,
    value_and_newton_direction as value_and_newton_direction,
)
from ._options import (
    Fit as Fit,
    Fixed as Fixed,
    Integrator as Integrator,
    Verified as Verified,
)
from ._pod import pod as pod
from ._state import (
    Diagnostics as Diagnostics,
    best_params as best_params,
    diagnostics as diagnostics,
    filter_value_and_grad as filter_value_and_grad,
    gradient_evaluations as gradient_evaluations,
    needs_gradient as needs_gradient,
    status_message as status_message,
    value_and_grad as value_and_grad,
)
from ._status import STATUS_MESSAGES as STATUS_MESSAGES, Status as Status
from ._stlsq import stlsq as stlsq
from ._validate import static_args as static_args
from ._verified import VerifiedState as VerifiedState

try:
    from importlib.metadata import version as _version

    __version__ = _version("lgfjax")
except Exception:  # not installed (e.g. a source checkout on sys.path)
    __version__ = "unknown"


def __getattr__(name):
    # optimistix is optional: import the minimiser only when it is asked for.
    if name == "LGFMinimiser":
        from ._optimistix import LGFMinimiser

        return LGFMinimiser
    raise AttributeError(f"module 'lgfjax' has no attribute {name!r}")
