"""A griffe extension: read the docstrings' ``Example:`` sections as ``Examples:``.

The project's docstrings follow optax's ``Example:`` heading; griffe's Google parser
renders a singular ``Example:`` as a Markdown admonition, where the doctest lines
(``>>> x[0]``) would be read as Markdown, and parses only ``Examples:`` as code.
"""

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
