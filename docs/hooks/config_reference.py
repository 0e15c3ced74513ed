"""MkDocs hook: the pages that must not go stale, generated at build time from lisa_dist.config.

- `docs/configuration.md`'s marker becomes one table per config section: each field's name, type, default, allowed
  values and the attribute docstring written under it in lisa_dist/config.py (read with `ast`). Allowed values come
  from the field's type when it is a `typing.Literal`, else from `config.CHOICES`, else from the `_choice(...)`
  checks of the validation.
- `docs/launching.md`'s marker becomes the table of what each backend supports, read from `config.CAPABILITIES`
  and the docstrings of `Capabilities`' fields.

Run alone (`python docs/hooks/config_reference.py`), it prints both.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import json
import re
import typing
from pathlib import Path
from types import ModuleType

MARKERS = {"configuration.md": "<!-- config-reference -->", "launching.md": "<!-- backend-capabilities -->"}
"""Page -> the marker the generated Markdown replaces there."""


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs' hook: fill the marker of a generated page."""
    marker = MARKERS.get(page.file.src_uri)
    if marker is None:
        return markdown
    if marker not in markdown:
        raise ValueError(f"docs/{page.file.src_uri} lacks the marker {marker}: nowhere to write the generated table")
    generate = reference_markdown if page.file.src_uri == "configuration.md" else capabilities_markdown
    return markdown.replace(marker, generate())


def reference_markdown() -> str:
    """Every section of lisa_dist.config.Config as a Markdown table."""
    from lisa_dist import config

    source = Path(config.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    choices = {**checked_choices(tree, config), **getattr(config, "CHOICES", {})}
    parts = []
    for section in dataclasses.fields(config.Config):
        cls = type(getattr(config.Config(), section.name))
        parts.append(section_markdown(section.name, cls, classes[cls.__name__], choices))
    return "\n\n".join(parts) + "\n"


def section_markdown(name: str, cls: type, node: ast.ClassDef, choices: dict[str, tuple]) -> str:
    hints = typing.get_type_hints(cls)
    defaults = dataclasses.asdict(cls())
    docs = field_docstrings(node)
    lines = [f"## `{name}`", ""]
    if ast.get_docstring(node):
        lines += [" ".join(ast.get_docstring(node).split()), ""]
    lines += ["| field | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        dotted = f"{name}.{f.name}"
        allowed = literal_values(hints[f.name]) or tuple(choices.get(dotted, ()))
        lines.append(
            " | ".join(
                [
                    f"| `{dotted}`",
                    f"`{type_name(hints[f.name])}`".replace("|", "\\|"),
                    f"`{json.dumps(defaults[f.name])}`",
                    ", ".join(value_code(v) for v in allowed),
                    cell(docs.get(f.name, "")) + " |",
                ]
            )
        )
    return "\n".join(lines)


def capabilities_markdown() -> str:
    """One row per capability, one column per backend: what each backend supports, as it declares it."""
    from lisa_dist import config

    table = config.CAPABILITIES
    cls = type(next(iter(table.values())))
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = field_docstrings(node)
    lines = [
        "| capability | " + " | ".join(f"`{name}`" for name in table) + " |",
        "| --- | " + " | ".join("---" for _ in table) + " |",
    ]
    for f in dataclasses.fields(cls):
        values = [capability_cell(getattr(caps, f.name)) for caps in table.values()]
        lines.append(f"| `{f.name}`: {cell(docs.get(f.name, ''))} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def capability_cell(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"`{value}`"


def value_code(value: typing.Any) -> str:
    """An allowed value as a code span; the empty string shows as `""`."""
    return f"`{json.dumps(value) if value == '' or not isinstance(value, str) else value}`"


def field_docstrings(node: ast.ClassDef) -> dict[str, str]:
    """Field name -> the string literal right under its annotated assignment (an attribute docstring)."""
    docs = {}
    for stmt, after in zip(node.body, [*node.body[1:], None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[stmt.target.id] = " ".join(str(after.value.value).split())
    return docs


def literal_values(hint: typing.Any) -> tuple:
    """The values of a Literal type, also inside `Literal[...] | None`; () for any other type."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return next((values for arg in typing.get_args(hint) if (values := literal_values(arg))), ())


def type_name(hint: typing.Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(sorted({type(a).__name__ for a in args}))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def checked_choices(tree: ast.Module, module: ModuleType) -> dict[str, tuple]:
    """`_choice("section.key", value, NAME)` calls of the validation: dotted name -> the tuple NAME holds."""
    found = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "_choice"
            and len(node.args) == 3
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[2], ast.Name)
        ):
            values = getattr(module, node.args[2].id, None)
            if isinstance(values, tuple) and isinstance(node.args[0].value, str):
                found[node.args[0].value] = values
    return found


def cell(text: str) -> str:
    """Text for a table cell: `|` escaped, and `<`/`>` escaped outside code spans (`<output_dir>` is not HTML)."""
    pieces = re.split(r"(`[^`]*`)", text)
    escaped = [p if p.startswith("`") else html.escape(p, quote=False) for p in pieces]
    return "".join(escaped).replace("|", "\\|")


if __name__ == "__main__":
    print(reference_markdown())
    print(capabilities_markdown())
