"""Errors raised by morph.

Every error a user can cause derives from :class:`MorphError`. Its message is one line that says what
is wrong, where (node, module path, file) and what to do. The CLI prints it and exits with code 2.
"""

from __future__ import annotations

__all__ = ["MorphError", "UnsupportedOpError", "CheckpointError", "ModelNotFoundError"]


class MorphError(Exception):
    """Base class of every user-facing morph error."""


class ModelNotFoundError(MorphError):
    """A model spec names no timm, torchvision or user model."""


class UnsupportedOpError(MorphError):
    """The channel analysis met an operation it cannot couple.

    Args:
        node: fx node name.
        qualname: module path the node belongs to ("" at top level).
        what: what the analysis could not handle.
        hint: what the user can do.
    """

    def __init__(self, node: str, qualname: str, what: str, hint: str = "") -> None:
        self.node, self.qualname, self.what, self.hint = node, qualname, what, hint
        where = f"{node} ({qualname})" if qualname else node
        msg = f"cannot analyze channels at {where}: {what}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class CheckpointError(MorphError):
    """A checkpoint file is missing, truncated, corrupt, foreign or mismatched."""
