"""Load a job spec: safe YAML that keeps line numbers, ``--set`` overrides, one pass of checks.

Every problem found (duplicate keys, bad overrides, control characters, pydantic errors) is reported at
once as a `Problem` with the path the user wrote and the line it is on. This module imports no torch,
Ray or transformers: ``tunerun validate`` must answer in about a second.
"""
from __future__ import annotations

import copy
import difflib
import types
import unicodedata
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError

from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.spec import JobSpec

M = TypeVar("M", bound=BaseModel)

FROM_SET = " (from --set)"
CONTROL_MESSAGE = "must not contain control characters or newlines (they could reach a launch script)"
# The two fields without a default, written the way a user would write them.
_EXAMPLES = {"model": "model: {path: ./models/my-model}", "model.path": "model.path: ./models/my-model",
             "data": "data: {train: data/train.jsonl}", "data.train": "data.train: data/train.jsonl"}
_COMPARISONS = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reports duplicate keys and records the 1-based line of every key and list item."""

    def __init__(self, text: str):
        super().__init__(text)
        self.lines: dict[str, int] = {}
        self.duplicates: list[Problem] = []
        # Constructors are handed a node, never its place in the tree, so parents note it for their children.
        self._paths: dict[int, tuple] = {}

    def construct_document(self, node):
        self._paths[id(node)] = ()
        return super().construct_document(node)

    def _enter(self, node, path: tuple, line: int) -> None:
        self._paths.setdefault(id(node), path)  # an aliased node keeps the path where it was anchored
        self.lines[_dotted(path)] = line  # last occurrence wins, like the value itself

    def construct_mapping(self, node, deep=False):
        path = self._paths.get(id(node), ())
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' is meant to be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor refuses it below, with a line and column
            line = key_node.start_mark.line + 1
            self._enter(value_node, path + (key,), line)
            if key in first:
                self.duplicates.append(
                    Problem(_dotted(path + (key,)), f"duplicate key (first at line {first[key]})", line))
            first.setdefault(key, line)
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node, deep=False):
        path = self._paths.get(id(node), ())
        for index, item in enumerate(node.value):
            self._enter(item, path + (index,), item.start_mark.line + 1)
        return super().construct_sequence(node, deep)

    def refuse_tag(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConstructorError(None, None, f"tag {tag} is not allowed: a job spec holds plain values only",
                               node.start_mark)


_SpecLoader.add_constructor(None, _SpecLoader.refuse_tag)
# pydantic turns bytes into str, which would slip past the control-character check.
_SpecLoader.add_constructor("tag:yaml.org,2002:binary", _SpecLoader.refuse_tag)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """The data, the line of each dotted path, and duplicate-key problems; unreadable YAML raises."""
    try:
        loader = _SpecLoader(text)  # the reader already refuses unprintable characters here
        try:
            return loader.get_single_data(), loader.lines, loader.duplicates
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = Problem("", where + (e.problem or e.context or str(e)), mark.line + 1 if mark else None)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        problem = Problem("", f"line {line}: character U+{e.character:04X} is not allowed ({e.reason})", line)
    except RecursionError:
        problem = Problem("", "nested too deeply to be a job spec")
    raise SpecError(source, [problem])


def parse_override(item: str) -> tuple[list[str], object]:
    """``"training.max_steps=20"`` → ``(["training", "max_steps"], 20)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        raise SpecError("--set", [Problem(key.strip(), f"--set {item!r} must look like dotted.key=value, "
                                                       "e.g. --set training.max_steps=20")])
    try:
        value, _, duplicates = _parse_yaml(raw, "--set")
    except SpecError as e:
        duplicates = e.problems
    if duplicates:
        detail = "; ".join(f"{p.path + ': ' if p.path else ''}{p.message}" for p in duplicates)
        raise SpecError("--set", [Problem(".".join(parts), f"cannot parse the value of --set {item!r}: {detail}")])
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with each ``dotted.key=value`` set, creating sections on the way."""
    result, _, problems = _apply(data, overrides)
    if problems:
        raise SpecError("--set", problems)
    return result


def _apply(data: dict, overrides: Sequence[str]) -> tuple[dict, set[str], list[Problem]]:
    """Like `apply_overrides`, but also returns the dotted keys set and keeps going past bad items."""
    data, overridden, problems = copy.deepcopy(data), set(), []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except SpecError as e:
            problems.extend(e.problems)
            continue
        problem = _set_nested(data, parts, value)
        if problem:
            problems.append(problem)
        else:
            overridden.add(_dotted(parts))
    return data, overridden, problems


def _set_nested(data: dict, parts: list[str], value: object) -> Problem | None:
    node = data
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}  # a missing or empty (`targets:`) section becomes a mapping, as in the file
        node = node[part]
        if not isinstance(node, dict):
            where = _dotted(parts[: depth + 1])
            hint = f"; set the whole list, e.g. --set {where}=[a,b]" if isinstance(node, list) else ""
            return Problem(_dotted(parts), f"cannot set a key inside {where}: it is {_kind(node)}, "
                                           f"not a mapping{hint}{FROM_SET}")
    node[parts[-1]] = value
    return None


def load_job(path: str | Path, overrides: Sequence[str] = (), model: type[JobSpec] = JobSpec) -> JobSpec:
    """Read, override and validate the job spec at ``path``; raises `SpecError` with every problem. ``model``:
    `JobSpec` extended with the targets' settings (`tunerun.cluster.targets.job_model`), which checks the
    ``targets:`` block too; the job returned is a `JobSpec` either way, its target settings plain data."""
    return load_job_text(read_spec_text(path), str(path), overrides, model)


def load_config(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """`load_job` for another YAML file checked the same way (the server's config): ``model`` validates it."""
    return load_config_text(read_spec_text(path), str(path), model, overrides)


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file, or `SpecError` saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        message = "file does not exist"
    except IsADirectoryError:
        message = "is a directory, not a job spec file"
    except UnicodeDecodeError as e:
        message = f"cannot be read: not UTF-8 text (byte {e.start})"
    except OSError as e:
        message = f"cannot be read: {e.strerror or e}"
    raise SpecError(str(path), [Problem("", message)])


def load_job_text(text: str, source: str = "<string>", overrides: Sequence[str] = (),
                  model: type[JobSpec] = JobSpec) -> JobSpec:
    """`load_job` for a spec already in memory; ``source`` names it in messages."""
    spec = load_config_text(text, source, model, overrides)
    return spec if model is JobSpec else JobSpec.model_validate(spec.model_dump())


def load_config_text(text: str, source: str, model: type[M], overrides: Sequence[str] = ()) -> M:
    data, lines, problems = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise SpecError(source, [*problems, Problem("", _not_a_mapping(data, model))])
    data, overridden, override_problems = _apply(data, overrides)
    problems += override_problems
    found = list(_control_characters(data, ()))
    try:
        spec = model.model_validate(data)
    except ValidationError as e:
        flagged = {path for path, _ in found}  # a control character there is the one thing to fix
        found += [(path, message) for path, message in _validation_problems(e, model) if path not in flagged]
    problems += [_place(path, message, lines, overridden) for path, message in found]
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError(source, sorted(unique, key=lambda p: (p.line is None, p.line or 0)))
    return spec


def _not_a_mapping(data: object, model: type[BaseModel]) -> str:
    keys = ", ".join(list(model.model_fields)[:3])
    if data is None and issubclass(model, JobSpec):
        return "the spec is empty: write a mapping with at least model.path and data.train"
    if data is None:
        return f"the file is empty: write a mapping of keys ({keys}, ...)"
    return f"must be a mapping of keys ({keys}, ...), got {_kind(data)}"


def _place(path: str, message: str, lines: dict[str, int], overridden: set[str]) -> Problem:
    """Put the problem on the line of its key, or of the nearest enclosing key written in the file."""
    parts = path.split(".") if path else []
    prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    if any(prefix in overridden for prefix in prefixes):
        return Problem(path, message + FROM_SET)
    return Problem(path, message, next((lines[p] for p in prefixes if p in lines), None))


def _control_characters(value: object, path: tuple) -> Iterator[tuple[str, str]]:
    # Spec strings end up in sbatch scripts and manifests, where a newline starts a new command.
    if isinstance(value, str) and _has_control(value):
        yield _dotted(path), CONTROL_MESSAGE
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _has_control(key):
                yield _dotted(path + (key,)), "key " + CONTROL_MESSAGE
            yield from _control_characters(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _control_characters(item, path + (index,))


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def _validation_problems(error: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """(dotted path, message) for each pydantic error; the branches of one union become one problem."""
    found, unions = [], {}
    for err in error.errors(include_url=False):
        path, annotation, union_at = _walk(err["loc"], root)
        if union_at is None:
            found.append(_explain(err, path, annotation, root))
        else:
            unions.setdefault(tuple(path[:union_at]), []).append((err, path, annotation))
    for prefix, branches in unions.items():
        # A branch that failed deeper inside (one list item) is the one the user meant; the others are noise.
        deeper = [b for b in branches if len(b[1]) > len(prefix)]
        if deeper:
            found += [_explain(*b, root) for b in deeper]
        else:
            described = [_describe(err, annotation) for err, _, annotation in branches]
            found.append((_dotted(prefix), _expected(described, branches[0][0]["input"])))
    return found


def _explain(err: dict, path: list, annotation: object, root: type[BaseModel]) -> tuple[str, str]:
    kind, where, got = err["type"], _dotted(path), err.get("input")
    if kind == "spec_field":  # raised by spec.field_error: ctx path is relative to the model that raised it
        return _dotted([*path, *err["ctx"]["path"].split(".")]), err["msg"]
    if kind == "extra_forbidden":
        return where, _unknown_key(str(path[-1]), _walk(err["loc"][:-1], root)[1])
    if kind == "missing":
        return where, f"required — e.g. {_EXAMPLES[where]}" if where in _EXAMPLES else "required"
    if kind == "value_error":
        return where, err["msg"].removeprefix("Value error, ")
    if kind in ("literal_error", "enum"):
        return where, _expected([_describe(err, annotation)], got)
    message = f"{_describe(err, annotation)[0]} (got {_show(got)})"
    if kind == "string_type" and (isinstance(got, (bool, int, float)) or type(got).__module__ == "datetime"):
        message += " — quote it: YAML reads some bare words as numbers, dates or true/false"
    return where, message


def _describe(err: dict, annotation: object) -> tuple[str, list[str]]:
    """What the field accepts, as a phrase, and the literal choices to suggest from."""
    kind, ctx = err["type"], err.get("ctx", {})
    if kind in ("literal_error", "enum"):
        choices = [str(c) for c in get_args(annotation)] if get_origin(annotation) is Literal else []
        if not choices:
            return str(ctx.get("expected", "another value")), []
        return ("one of " if len(choices) > 1 else "") + ", ".join(choices), choices
    if kind in _COMPARISONS:
        return f"must be {_COMPARISONS[kind]} {_show(next(iter(ctx.values())))}", []
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a mapping of keys", []
    return err["msg"].replace("Input should be", "must be", 1), []


def _expected(described: list[tuple[str, list[str]]], got: object) -> str:
    phrases = [phrase.removeprefix("must be ") for phrase, _ in described]
    message = f"expected {' or '.join(phrases)} (got {_show(got)})"
    choices = [choice for _, options in described for choice in options]
    close = difflib.get_close_matches(got, choices, n=1) if isinstance(got, str) else []
    return message + (f" — did you mean '{close[0]}'?" if close else "")


def _unknown_key(key: str, annotation: object) -> str:
    model = next((m for m in _members(annotation) if _is_model(m)), None)
    allowed = list(model.model_fields) if model else []
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key — did you mean '{close[0]}'?"
    return f"unknown key; allowed: {', '.join(allowed)}" if allowed else "unknown key"


def _walk(loc: tuple, root: type[BaseModel]) -> tuple[list, object, int | None]:
    """Follow a pydantic ``loc`` through the annotations of ``root`` (the job spec): the path the user wrote
    (without union-branch tags like ``list[str]`` or ``[key]``), the annotation it ends at, and where a union
    branch was taken."""
    path, annotation, union_at = [], root, None
    for part in loc:
        members = _members(annotation)
        branch = _branch(members, part) if len(members) > 1 else None
        if branch is not None:
            annotation, union_at = branch, len(path)
            continue
        if part == "[key]":
            annotation = None
            continue
        path.append(part)
        annotation = _child(members, part)
    return path, annotation, union_at


def _members(annotation: object) -> tuple:
    """The alternatives of ``X | Y | None`` without None, or just the annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _branch(members: tuple, tag: object) -> object:
    # pydantic tags union errors with the branch type: "literal['all-linear']", "list[str]", "ModelSpec".
    if not isinstance(tag, str):
        return None
    for member in members:
        origin = get_origin(member)
        label = "literal" if origin is Literal else getattr(origin or member, "__name__", "")
        if label.lower() == tag.split("[")[0].lower():
            return member
    return None


def _child(members: tuple, part: object) -> object:
    for member in members:
        origin = get_origin(member)
        if _is_model(member) and part in member.model_fields:
            return member.model_fields[part].annotation
        if origin is list and isinstance(part, int) or origin is dict:
            return get_args(member)[-1]
    return None


def _is_model(annotation: object) -> bool:
    # On Python 3.10 list[str] passes isinstance(..., type) but breaks issubclass, hence the origin check.
    return get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _dotted(parts) -> str:
    # repr() escapes a newline in a key, so it cannot break the line a problem is printed on.
    return ".".join(repr(p)[1:-1] if isinstance(p, str) and _has_control(p) else str(p) for p in parts)


def _kind(value: object) -> str:
    kinds = {str: "a string", list: "a list", dict: "a mapping", bool: "true/false", int: "a number"}
    return kinds.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _show(value: object) -> str:
    """A value as the user wrote it in YAML: null and true/false rather than None and True."""
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
