"""A griffe extension for the API reference: the docstrings' Sphinx cross-reference roles
(``:class:`~dmlkit.x.Y```, ``:func:`name```, ...) become links to the named object where the
reference documents it, and inline code where it does not (a private helper, a PyTorch class)."""

from __future__ import annotations

import html
import re
from functools import partial
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`"
)


def _identifier(obj: griffe.Object, target: str) -> str | None:
    """The full path of a role's target, resolved in the docstring's scope, or None."""
    if target.startswith("dmlkit."):
        return target
    head, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except griffe.NameResolutionError:
        return None
    return f"{resolved}.{rest}" if rest else resolved


def _rewrite(obj: griffe.Object, match: re.Match[str]) -> str:
    target = match["target"].strip().rstrip("()")
    shown = html.escape(target.rsplit(".", 1)[-1] if match["tilde"] else target)
    identifier = _identifier(obj, target)
    if identifier is None:
        return f"<code>{shown}</code>"
    # An optional reference renders as plain code when nothing documents its target.
    return (
        f'<autoref identifier="{html.escape(identifier)}" optional><code>{shown}</code></autoref>'
    )


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of a package once it is completely loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        pending: list[griffe.Object] = [pkg]
        while pending:
            obj = pending.pop()
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(partial(_rewrite, obj), obj.docstring.value)
            pending.extend(m for m in obj.members.values() if isinstance(m, griffe.Object))
