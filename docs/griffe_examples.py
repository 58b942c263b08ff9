"""A griffe extension for the API pages: ``Example:`` sections and links to guides.

The project's docstrings follow optax's ``Example:`` heading; griffe's Google parser
renders a singular ``Example:`` as a Markdown admonition, where the doctest lines
(``>>> x[0]``) would be read as Markdown, and parses only ``Examples:`` as code.

Docstrings name a guide by its path in the repository, ````docs/guides/layouts.md````
(what a reader of the source or of ``help()`` can open); on the site that becomes a
link to the guide's page, checked by ``mkdocs build --strict`` like any other link.
"""

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_GUIDE = re.compile(r"``docs/guides/([\w-]+)\.md``")


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
            # The API pages live in docs/api/, next to docs/guides/.
            obj.docstring.value = _GUIDE.sub(r"[\1 guide](../guides/\1.md)", value)
