"""The one exception type for mistakes a user can fix, and the test for a number a user gave.

`eejax.main` prints a `UserError` as a single line (no traceback) and exits
with status 2. Everything else is a bug and keeps its traceback.
"""
import numbers


class UserError(Exception):
  """Bad input: a config value, a path, a checkpoint. The message says what to do."""


def first_line(e: BaseException, limit: int = 200) -> str:
  """The first line of an exception's message (its type's name when it has none), for a one-line report."""
  text = str(e).strip()
  return text.splitlines()[0][:limit] if text else e.__class__.__name__


def unknown_name(kind: str, name: str, valid) -> UserError:
  """`UserError` for a name that is not in a registry, listing the valid names."""
  return UserError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")


def is_number(v) -> bool:
  """A real number, numpy's too (NaN fails every range test by itself); a bool or a string is not one."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)
