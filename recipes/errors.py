"""The recipes' user errors: both are :class:`morph.MorphError`, which ``morph train`` and ``morph report``
print as one ``error: ...`` line (exit code 2); any other exception is a bug and keeps its traceback.

They also derive from the built-in exception they replace (``ValueError``, ``FileNotFoundError``), so
code that caught those still does.
"""

from __future__ import annotations

from morph.errors import MorphError

__all__ = ["RecipeError", "RecipePathError"]


class RecipeError(MorphError, ValueError):
    """A config, override or option that cannot run: unknown key, wrong type, a value out of range, a run
    directory that holds another run, a budget that leaves no step."""


class RecipePathError(MorphError, FileNotFoundError):
    """A path the user named (data root, split folder, run directory) that is missing or not what it
    should be."""
