"""Notice templates: plain-text files shipped in this package, each overridable without code.

A template is ``templates/<language>/<kind>.txt``: the first line is ``Subject: …``, the rest is
the body, with ``string.Template`` placeholders (``$customer``, ``${start}``; ``$$`` is a dollar
sign). The placeholders are :data:`~workers.notify.messages.FIELDS`. A file at the same relative
path under CALHOOK_TEMPLATE_DIR (e.g. ``/etc/calhook/templates/de/cancelled.txt``) replaces the
built-in one; the others stay built-in. Files are read at each render, so an edited override
applies to the next notice without a restart.

E-mail and chat use the same templates: the subject becomes the chat message's bold first line.

A template naming a placeholder that does not exist fails loudly (:class:`TemplateError`, naming
the file), never with a silently half-filled notice; :func:`check_templates` finds such a file at
worker start.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template

from workers.notify._format import Language
from workers.notify.errors import TemplateError
from workers.notify.messages import FIELDS, LANGUAGES, Kind

_BUILT_IN = importlib.resources.files("workers.notify") / "templates"
_SUBJECT = "subject:"


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered notice: a one-line subject and a body ending in a newline."""

    subject: str
    body: str


def template_path(kind: Kind, language: Language) -> str:
    """The template's path relative to the template folder: ``de/cancelled.txt``."""
    return f"{language}/{kind.value}.txt"


def load(kind: Kind, language: Language, template_dir: str = "") -> tuple[str, str]:
    """``(origin, text)`` of the template: the override in ``template_dir`` if there is one."""
    relative = template_path(kind, language)
    if template_dir:
        override = Path(template_dir) / relative
        if override.is_file():
            try:
                return str(override), override.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"template {override}: cannot read it ({exc})") from None
    return f"built-in {relative}", (_BUILT_IN / language / f"{kind.value}.txt").read_text(
        encoding="utf-8"
    )


def render(
    kind: Kind, language: Language, fields: Mapping[str, str], template_dir: str = ""
) -> Rendered:
    """Fill the template of (kind, language) with ``fields``; TemplateError if it cannot."""
    origin, text = load(kind, language, template_dir)
    subject, body = _split(origin, text)
    return Rendered(
        subject=" ".join(_substitute(origin, subject, fields).split()),
        body=_substitute(origin, body, fields).rstrip() + "\n",
    )


def check_templates(template_dir: str = "") -> None:
    """Render every template with sample values; raise TemplateError at the first bad one."""
    sample = dict.fromkeys(FIELDS, "x")
    for language in LANGUAGES:
        for kind in Kind:
            render(kind, language, sample, template_dir)


def _split(origin: str, text: str) -> tuple[str, str]:
    first, _, rest = text.lstrip("\ufeff").partition("\n")
    if not first.lower().startswith(_SUBJECT):
        raise TemplateError(f"template {origin}: the first line must be 'Subject: …'")
    return first[len(_SUBJECT) :].strip(), rest.lstrip("\r\n")


def _substitute(origin: str, text: str, fields: Mapping[str, str]) -> str:
    template = Template(text)
    if not template.is_valid():
        raise TemplateError(
            f"template {origin}: a '$' starts no placeholder (write $$ for a dollar sign)"
        )
    unknown = sorted(set(template.get_identifiers()) - set(fields))
    if unknown:
        raise TemplateError(
            f"template {origin}: unknown placeholder(s) "
            f"{', '.join('$' + name for name in unknown)}; known: "
            f"{', '.join('$' + name for name in FIELDS)}"
        )
    return template.substitute(fields)
