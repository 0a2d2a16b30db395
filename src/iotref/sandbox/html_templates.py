"""The sandbox's HTML pages from template files: :class:`string.Template` files (``$name``
placeholders) in a package's ``templates/`` folder, filled with values that are
HTML-escaped unless they are already rendered :class:`Html`."""

from __future__ import annotations

from html import escape
from importlib import resources
from string import Template

FOLDER = "templates"


class Html(str):
    """Markup already rendered (a template's output): inserted into a template as is."""


class Templates:
    """The template files of one package, read once."""

    def __init__(self, package: str) -> None:
        self.package = package
        self._texts: dict[str, str] = {}
        self._templates: dict[str, Template] = {}

    def text(self, name: str) -> str:
        """The file ``name`` as it is (e.g. a style sheet to inline)."""
        text = self._texts.get(name)
        if text is None:
            text = (resources.files(self.package) / FOLDER / name).read_text("utf-8")
            self._texts[name] = text
        return text

    def render(self, name: str, /, **values: str) -> Html:
        """The template ``name`` filled with ``values`` (every placeholder needs one):
        plain strings HTML-escaped, :class:`Html` as is."""
        template = self._templates.get(name)
        if template is None:
            template = Template(self.text(name).rstrip("\n"))
            self._templates[name] = template
        escaped = {key: v if isinstance(v, Html) else escape(v) for key, v in values.items()}
        return Html(template.substitute(escaped))
