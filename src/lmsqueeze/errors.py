"""User-facing errors: one line that says what went wrong and what to do."""


class LmsqueezeError(ValueError):
    """A bad input from the user (path, config, artifact, model). The CLI prints it as one line."""
