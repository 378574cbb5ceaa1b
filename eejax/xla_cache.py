"""JAX's persistent compilation cache, on for every training job unless switched off.

A job started again (resumed after a stop, a finished run evaluated again) or one of a launcher's many runs of
the same model loads its compiled programs from disk instead of compiling them again; on a GPU, XLA's
convolution autotuning results are kept there too (JAX's `jax_persistent_cache_enable_xla_caches`). The
folder is `config.compile_cache_dir` (`~/.cache/eejax/xla` by default; '' leaves JAX's setting alone). JAX's
own setting wins where it has one (the JAX_COMPILATION_CACHE_DIR environment variable, or `jax.config`):
eejax never moves a cache its user placed.

JAX keys every entry by the program, the jax and XLA versions, the backend and its flags, so an entry is
reused only where it is the same compilation. The folder grows by one file per distinct program (a few
hundred KB on a CPU) and can be deleted at any time. JAX treats the folder as trusted code: keep it private.
"""
import os

import jax

DEFAULT = "~/.cache/eejax/xla"


def jax_folder() -> str | None:
  """The folder JAX already caches in (from JAX_COMPILATION_CACHE_DIR or `jax.config`), or None."""
  return jax.config.jax_compilation_cache_dir or None


def enable(path: str) -> str | None:
  """Points JAX's compilation cache at `path` (~ expanded) unless JAX already has a folder; returns the folder
  in use, or None where there is none ('' and no folder of JAX's own).

  Takes effect for compilations after the call, also where this process compiled something before.
  """
  current = jax_folder()
  if current:
    return current
  if not path:
    return None
  folder = os.path.abspath(os.path.expanduser(path))
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.set_cache_dir(folder)
  compilation_cache.reset_cache()  # where a JAX version decided at its first compilation: decide again
  return folder
