"""gastro-dist: distributed two-phase transfer learning for gastroscopy image classifiers.
The package layout, one concern per module, and the one-way import order: README, "Layout".
Errors a user can act on are `UserError` (exit 2) and `RunFailure` (exit 1); `Preempted` exits 75."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix in the command line or the config (a bad value, a missing file).

    The CLI prints it as one line on stderr and exits with `exit_status` 2, like argparse's usage errors.
    """

    exit_status = 2


class RunFailure(UserError):
    """The command was right but the run could not complete: unreadable input data, a full disk,
    a diverged training. One line on stderr, exit status 1."""

    exit_status = 1


class Preempted(Exception):
    """Training stopped at a step boundary after a preemption request; a checkpoint was saved. The CLI
    exits with `PREEMPT_EXIT_CODE`, on which the SLURM scripts requeue the job."""


PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"
