"""The one exception type for user mistakes.

Everything a user can get wrong (a path, an obs key, the kind of values in a matrix)
raises :class:`ScProtoInputError` with a one-paragraph message that names the problem and
what to do. The command-line entry points print that message and exit non-zero instead
of showing a traceback.
"""


class ScProtoInputError(ValueError):
    """Bad input data or settings; the message says what was found and what to do."""
