"""The collectives of a multi-process job, in a single process (real multi-process jobs: tests/test_distributed.py)."""
import pytest

from eejax import collectives
from eejax.errors import UserError


def test_a_single_process_agrees_with_itself():
  assert collectives.gather(7) == [7] and collectives.gather(-1) == [-1]
  assert collectives.any_process(True) is True and collectives.any_process(False) is False
  collectives.agree(None)  # no problem: nothing raised
  collectives.barrier("alone")  # returns at once
  with pytest.raises(UserError, match=r"^the workdir is in use$"):  # its own problem, word for word
    collectives.agree("the workdir is in use")
