"""Read a recipe file into a ``Recipe``, turning every problem into one ``RecipeError``.

Errors name the file, the field path (``variants.0.scheme``) and the line where YAML puts that
field, so an editor can jump to it. Duplicate keys are errors too (YAML would silently keep the
last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import RecipeError
from pipeline.hashing import digest_bytes
from pipeline.recipe.schema import Recipe


class LoadedRecipe:
    """A validated recipe plus where it came from.

    Attributes:
        recipe: the validated model.
        path: the recipe file (absolute).
        digest: sha256 of the file's bytes (recorded in manifests).
    """

    def __init__(self, recipe: Recipe, path: Path, digest: str, lines: dict[tuple, int] | None = None):
        self.recipe = recipe
        self.path = path
        self.digest = digest
        self._lines = lines or {}

    def error(self, message: str, at: tuple, fix: str | None = None) -> RecipeError:
        """A ``RecipeError`` for a problem found after parsing (e.g. at plan time), pointing at
        the field ``at`` (a path like ``("variants", 0, "group_size")``) and its line."""
        line = None
        for depth in range(len(at), 0, -1):
            line = self._lines.get(tuple(at[:depth]))
            if line is not None:
                break
        return RecipeError(message, file=_shown(self.path), field=".".join(map(str, at)), line=line, fix=fix)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".lock.json")


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Parse and validate a recipe file.

    Raises:
        RecipeError: unreadable file, malformed YAML, duplicate keys, schema violations.
    """
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError on Python 3.11)
        raise RecipeError(f"cannot resolve the path: {e}", file=str(path), fix="check the path") from None
    shown = _shown(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("file not found", file=shown, fix="check the path") from None
    except OSError as e:
        raise RecipeError(f"cannot read: {e.strerror}", file=shown) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text (byte {e.start})", file=shown) from None

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            f"malformed YAML: {problem}",
            file=shown,
            line=mark.line + 1 if mark else None,
            fix="fix the YAML syntax",
        ) from None
    except RecursionError:
        raise RecipeError("YAML nested too deeply", file=shown, fix="flatten the recipe") from None
    if node is None:
        raise RecipeError("empty recipe", file=shown, fix="see recipes/ for examples")
    lines: dict[tuple, int] = {}
    # The graph is checked (cycles, non-scalar keys, alias bombs) before anything constructs it:
    # yaml.safe_load would build a recursive list from `x: &a [*a]` and pydantic would recurse forever.
    _index_lines(node, (), lines, shown, set(), [0])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # e.g. a tag the safe loader refuses (!!python/object)
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(
            f"malformed YAML: {getattr(e, 'problem', None) or e}", file=shown,
            line=mark.line + 1 if mark else None, fix="use plain YAML: mappings, lists, strings, numbers",
        ) from None
    except (ValueError, TypeError, OverflowError) as e:  # a scalar the constructor cannot convert, e.g. a bad date
        raise RecipeError(f"malformed YAML value: {e}", file=shown, fix="quote the value") from None
    except RecursionError:
        raise RecipeError("YAML nested too deeply", file=shown, fix="flatten the recipe") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping at the top level", file=shown, line=1)

    try:
        recipe = Recipe.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        raise _first_error(e, shown, lines, data) from None
    return LoadedRecipe(recipe, path, digest_bytes(raw), lines)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# A recipe has a few hundred nodes; aliases can multiply that (each `*a` repeats its anchor's
# subtree), so a bound keeps a "billion laughs" file from taking forever.
_MAX_NODES = 100_000


def _index_lines(node: yaml.Node, at: tuple, lines: dict[tuple, int], shown: str, path: set[int],
                 count: list[int]) -> None:
    """Map every field path in the YAML tree to its 1-based line; reject duplicate keys,
    non-scalar keys, recursive aliases (``path``: the nodes above this one) and alias bombs."""
    lines.setdefault(at, node.start_mark.line + 1)
    count[0] += 1
    if count[0] > _MAX_NODES:
        raise RecipeError(f"YAML expands to more than {_MAX_NODES} nodes (aliases repeated inside aliases?)",
                          file=shown, line=node.start_mark.line + 1, fix="write the recipe without nested aliases")
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return
    if id(node) in path:
        raise RecipeError("recursive YAML alias (an anchor used inside itself)", file=shown,
                          field=".".join(map(str, at)) or None, line=node.start_mark.line + 1,
                          fix="remove the alias that refers to its own anchor")
    path = path | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(
                    "a key must be a plain name, not a list or mapping", file=shown,
                    field=".".join(map(str, at)) or None, line=key_node.start_mark.line + 1,
                    fix="write the key as a plain name",
                )
            key = key_node.value
            if key in seen:
                raise RecipeError(
                    f"duplicate key {key!r}",
                    file=shown,
                    field=".".join(map(str, at + (key,))),
                    line=key_node.start_mark.line + 1,
                    fix="keep one of them",
                )
            seen.add(key)
            # A key's own line beats its value's (for a block value they differ).
            lines[at + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, at + (key,), lines, shown, path, count)
    else:
        for i, item in enumerate(node.value):
            _index_lines(item, at + (i,), lines, shown, path, count)


def _first_error(exc: ValidationError, shown: str, lines: dict[tuple, int], data: dict) -> RecipeError:
    """Turn pydantic's error list into one targeted ``RecipeError``.

    Pydantic's location contains union tags (the value of ``backend:``/``kind:``, e.g.
    ``llmcompressor``) that are not in the YAML; they are dropped from the printed path, and the
    line is that of the deepest YAML node found.
    """
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # Point at the discriminator key itself (``backend:``/``kind:``), not the whole item.
        loc += (_discriminator(err),)
    yaml_path: tuple = ()
    line = lines.get(())
    last = -1
    for i, part in enumerate(loc):
        candidate = yaml_path + (part,)
        if candidate in lines:
            yaml_path, line, last = candidate, lines[candidate], i
    # Keep the parts beyond the YAML (a missing field's name) but not union tags.
    tags = _tag_values(data, yaml_path)
    extra = [p for p in loc[last + 1 :] if p not in tags]
    field = ".".join(map(str, yaml_path + tuple(extra))) or None
    message = _message(err)
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problem(s))"
    return RecipeError(message, file=shown, field=field, line=line, fix=_fix(err))


def _tag_values(data: Any, path: tuple) -> set:
    """Discriminator values (``backend``/``kind``) of the mapping at ``path`` in the raw data."""
    node = data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return set()
    if not isinstance(node, dict):
        return set()
    return {node[k] for k in ("backend", "kind") if isinstance(node.get(k), str)}


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown {_discriminator(err)} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"missing '{_discriminator(err)}'"
    if kind == "literal_error":
        return f"{msg} (got {err.get('input')!r})"
    return msg.removeprefix("Value error, ")


def _discriminator(err: dict) -> str:
    return str(err.get("ctx", {}).get("discriminator", "kind")).strip("'")


def _fix(err: dict) -> str | None:
    if err["type"] == "extra_forbidden":
        return "remove it or check its spelling; `modelbuild schema` lists every key"
    if err["type"] in ("missing", "union_tag_not_found"):
        return "add it"
    return None
