"""The exceptions that mean "the user's input is wrong" (exit status 2, one ``error:`` line).

They live here, away from the modules that raise them, because those import pandas, torch or
timm: the CLIs catch these classes before any of that is loaded (``--help`` stays fast).
"""

from __future__ import annotations


class CatalogError(ValueError):
    """Nothing usable could be catalogued (the message lists why)."""


class WeightsError(ValueError):
    """A weight source that cannot be used (missing keys, wrong backbone, unsafe file)."""


class UsageError(ValueError):
    """An invocation that names something which does not exist (a tuning study, a run id)."""


class RegistryError(RuntimeError):
    """A product or version that is not in the registry, or a version that is incomplete."""


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the config:\n  "
                             + "\n  ".join(self.problems))
