"""lgfjax: learned gradient flow (LGF) optimisers for JAX and optax."""

from ._adam import AdamState as AdamState
from ._adam import lgf_adam as lgf_adam
from ._derivatives import finite_difference as finite_difference
from ._derivatives import strong_form as strong_form
from ._derivatives import test_functions as test_functions
from ._derivatives import weak_form as weak_form
from ._fit import STATUS_MESSAGES as STATUS_MESSAGES
from ._flow import RK4 as RK4
from ._flow import PolynomialFlow as PolynomialFlow
from ._lgf import LGFState as LGFState
from ._lgf import lgf as lgf
from ._library import feature_names as feature_names
from ._library import library_size as library_size
from ._library import polynomial_exponents as polynomial_exponents
from ._library import polynomial_library as polynomial_library
from ._newton import NewtonState as NewtonState
from ._newton import newton as newton
from ._newton import newton_direction as newton_direction
from ._newton import value_and_newton_direction as value_and_newton_direction
from ._pod import pod as pod
from ._state import Diagnostics as Diagnostics
from ._state import diagnostics as diagnostics
from ._state import gradient_evaluations as gradient_evaluations
from ._state import needs_gradient as needs_gradient
from ._state import status_message as status_message
from ._state import value_and_grad as value_and_grad
from ._stlsq import stlsq as stlsq

__version__ = "0.1.0"
