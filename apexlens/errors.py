"""The one error type of apexlens. Imports nothing, so every module can raise it."""


class ApexlensError(ValueError):
    """Bad input to an apexlens function (or a model it cannot handle exactly).

    The message names the problem and, where there is one, the fix.
    """
