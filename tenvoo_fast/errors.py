"""The one exception type users catch: bad configuration or input, with a message that names
the layer, what is wrong and how to fix it."""


class AdapterError(ValueError):
    """Invalid adapter configuration, input or checkpoint."""
