"""The exception type for invalid user input (budgets, genotypes, paths)."""


class BlockSwapError(ValueError):
    """Invalid input that the user can fix; the message names the value and the fix.

    The command line prints these as one line without a traceback.
    """
