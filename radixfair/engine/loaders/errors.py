"""The one error every loader raises for a model it cannot serve."""


class ModelLoadError(ValueError):
    """A model path that cannot be served; the message names the path and what was expected there."""
