"""The exception types users catch: bad configuration or input, with a message that names
what is wrong and how to fix it."""


class AdapterError(ValueError):
    """Invalid adapter configuration, input or checkpoint."""


class RunError(ValueError):
    """A fine-tuning run cannot start or continue: missing or unreadable data or weights, a
    volume size the model cannot take, or a run folder that does not match the request."""


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (library messages often span several), for ``error: ...``
    reports."""
    return " ".join(str(error).split()) or type(error).__name__
