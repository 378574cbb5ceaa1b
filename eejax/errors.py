"""The one exception type for mistakes a user can fix.

`eejax.main` prints a `UserError` as a single line (no traceback) and exits
with status 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input: a config value, a path, a checkpoint. The message says what to do."""


def unknown_name(kind: str, name: str, valid) -> UserError:
  """`UserError` for a name that is not in a registry, listing the valid names."""
  return UserError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
