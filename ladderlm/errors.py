"""The one exception type that reaches users as a single line, not a traceback."""


class LadderError(Exception):
    """A user-facing error: bad input, missing files, impossible configuration."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after writing a final checkpoint."""
