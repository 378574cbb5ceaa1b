"""What every eejax command line shares: absl flags, and a mistake as one line on stderr with status 2."""
import sys

from absl import flags


def fail(message: str, program: str = "eejax") -> None:
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv, program: str = "eejax"):
  """absl's parser, with flag and --config override mistakes as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e), program)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # unknown --config.key, bad value
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    fail(f"bad --config override: {message}", program)
