"""Why a surrogate step or phase failed: `Status`, its codes and their messages.

A guard is a code here plus one check where the engine takes or judges a step; within
a step the first failure wins.
"""

import enum


class Status(enum.IntEnum):
    """Why the last surrogate phase ended early or was undone (``status`` in the state).

    First failure wins within a step. `lgfjax.status_message` gives the text.
    """

    OK = 0
    NONFINITE_TRAJECTORY = 1
    FIT_FAILED = 2
    EMPTY_MODEL = 3
    SOLVER_FAILED = 4
    NONFINITE_STEP = 5
    STEP_TOO_LARGE = 6
    VALUE_REJECTED = 7
    FLOW_DISAGREED = 8
    LOSS_ROSE = 9
    NONFINITE_GRADIENT = 10
    LOSS_INCONCLUSIVE = 11
    RETURNED_TO_BEST = 12


# Module-level names kept for the engine code.
OK = Status.OK.value
NONFINITE_TRAJECTORY = Status.NONFINITE_TRAJECTORY.value
FIT_FAILED = Status.FIT_FAILED.value
EMPTY_MODEL = Status.EMPTY_MODEL.value
SOLVER_FAILED = Status.SOLVER_FAILED.value
NONFINITE_STEP = Status.NONFINITE_STEP.value
STEP_TOO_LARGE = Status.STEP_TOO_LARGE.value
VALUE_REJECTED = Status.VALUE_REJECTED.value
FLOW_DISAGREED = Status.FLOW_DISAGREED.value
LOSS_ROSE = Status.LOSS_ROSE.value
NONFINITE_GRADIENT = Status.NONFINITE_GRADIENT.value
LOSS_INCONCLUSIVE = Status.LOSS_INCONCLUSIVE.value
RETURNED_TO_BEST = Status.RETURNED_TO_BEST.value

STATUS_MESSAGES = {
    OK: "ok",
    NONFINITE_TRAJECTORY: "the recorded trajectory is not finite",
    FIT_FAILED: "the sparse regression returned non-finite coefficients",
    EMPTY_MODEL: "every library term was thresholded away",
    SOLVER_FAILED: "the ODE solver did not reach the end of the step",
    NONFINITE_STEP: "the surrogate step was not finite",
    STEP_TOO_LARGE: "the surrogate step left the trust region",
    VALUE_REJECTED: "value_fn rejected the surrogate phase; rolled back",
    FLOW_DISAGREED: "the true step after the surrogate phase disagreed with the learned flow",
    LOSS_ROSE: "the loss rose over the surrogate phase; rolled back",
    NONFINITE_GRADIENT: (
        "a true step's gradient or update was not finite; the step was skipped (and, if the "
        "loss there was not finite either, the iterate went back to the last true iterate)"
    ),
    LOSS_INCONCLUSIVE: (
        "the loss changed over the surrogate phase by less than its noise (mini-batches); "
        "kept, and the next phase keeps its length"
    ),
    RETURNED_TO_BEST: (
        "the loss at true steps stayed far above the best true loss; the run returned to "
        "the best true point and the base's state there, and its phases start short again"
    ),
}
