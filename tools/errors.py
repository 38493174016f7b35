"""The error the `tools` commands raise on purpose: bad arguments, named with the flag and
the fix. A ValueError too, so that library callers can catch it without knowing ours."""


class ToolError(ValueError):
    """A `tools` command cannot run with the arguments it was given."""
