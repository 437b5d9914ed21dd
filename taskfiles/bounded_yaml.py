"""YAML an agent wrote, loaded within bounds (depth, nodes, expanded text, plain tags
only), and YAML this service writes, dumped without anchors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    NodeEvent,
    ScalarEvent,
)

log = logging.getLogger(__name__)

MAX_TASK_DEPTH = 32  # the schema needs 4 levels; hand edits get plenty of room
# Scalars and collections in one agent YAML document. A task file has about a hundred, a
# triage of the most findings allowed a few thousand; checking each costs the parser's
# Python loop microseconds, so a megabyte of tiny nodes would cost seconds per read.
MAX_YAML_NODES = 20_000
# Characters of text one agent YAML document may expand to through its aliases (each
# string counted once per place it appears): twice what a file may hold without any.
MAX_EXPANDED_CHARS = 2 * 1024 * 1024
# Explicit tags a hand-written file may use; anything else (!!python/..., !!binary,
# !!set, local !tags) is refused.
PLAIN_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:int",
                        "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                        "tag:yaml.org,2002:null", "tag:yaml.org,2002:seq",
                        "tag:yaml.org,2002:map", "!"})


# libyaml's parser and loader when PyYAML has them (its wheels do): five times faster than
# PyYAML's own (a task file 1.5 -> 0.3 ms), which is most of a lookup that finds its file.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_agent_yaml(text: str, max_depth: int = MAX_TASK_DEPTH, *,
                    allow_aliases: bool = False) -> Any:
    """Load YAML an agent wrote: at most `max_depth` levels of nesting and MAX_YAML_NODES
    nodes, no explicit tags beyond the plain ones (yaml.YAMLError otherwise). Anchors and
    aliases are refused, or with `allow_aliases` accepted while the document they expand
    to stays within the same two bounds (the platform's tools write an anchor and an
    alias whenever they dump one timestamp twice).

    All of it is checked on the parser's event stream, which stops at the first offence,
    before any node is composed or object built. PyYAML's composer slows down
    quadratically with nesting depth and recurses once per level, so one "[[[[…" file
    would otherwise cost seconds on every read (or end it with a RecursionError); a 1 KB
    alias bomb expands to gigabytes."""
    try:
        _check_events(text, max_depth, allow_aliases)
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a safe loader, checked above
    except ValueError as err:  # an integer of more than 4300 digits, a lone surrogate
        raise yaml.YAMLError(str(err).splitlines()[0] if str(err) else "invalid") from None


def _line(event: yaml.Event) -> int:
    """The line an event starts on, counted from 1 (the parser marks every event it
    emits; the stubs allow an event without a mark)."""
    return event.start_mark.line + 1 if event.start_mark is not None else 0


class _EventBudget:
    """What one document's events expand to: values counted with every alias replaced by
    what its anchor holds, and the nesting that expansion reaches."""

    def __init__(self, max_depth: int, allow_aliases: bool) -> None:
        self.max_depth = max_depth
        self.allow_aliases = allow_aliases
        self.depth = self.documents = self.nodes = self.chars = 0
        # anchor -> (values it expands to, levels it spans, characters of text in it)
        self.anchors: dict[str, tuple[int, int, int]] = {}
        # per open collection: [anchor, values before it, levels below it, chars before it]
        self.open: list[list[Any]] = []

    def take(self, event: yaml.Event) -> None:
        if isinstance(event, CollectionEndEvent):
            self._close()
        elif isinstance(event, DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:  # refused now, not after walking a megabyte of documents
                raise yaml.YAMLError(f"expected a single document in the stream (line "
                                     f"{_line(event)})")
        elif isinstance(event, AliasEvent):
            self._alias(event)
        elif isinstance(event, NodeEvent):
            self._node(event)

    def _node(self, event: NodeEvent) -> None:
        line = _line(event)
        text = len(event.value) if isinstance(event, ScalarEvent) else 0
        self._grow(1, 1, line, text)
        if event.anchor is not None and not self.allow_aliases:
            raise yaml.YAMLError(f"anchors/aliases are not allowed (line {line})")
        tag = event.tag if isinstance(event, ScalarEvent | CollectionStartEvent) else None
        if tag is not None and tag not in PLAIN_TAGS:
            raise yaml.YAMLError(f"tag {tag[:60]!r} is not allowed (line {line})")
        if isinstance(event, CollectionStartEvent):
            self.open.append([event.anchor, self.nodes - 1, 0, self.chars])
            self.depth += 1
        elif event.anchor is not None:
            self.anchors[event.anchor] = (1, 1, text)

    def _alias(self, event: AliasEvent) -> None:
        line = _line(event)
        if not self.allow_aliases:
            raise yaml.YAMLError(f"anchors/aliases are not allowed (line {line})")
        found = self.anchors.get(event.anchor or "")
        if found is None:  # undefined, or its own enclosing collection: a cycle
            raise yaml.YAMLError(f"alias {str(event.anchor)[:60]!r} refers to no complete "
                                 f"anchored value (line {line})")
        values, levels, chars = found
        self._grow(values, levels, line, chars)

    def _grow(self, values: int, levels: int, line: int, chars: int = 0) -> None:
        self.nodes += values
        self.chars += chars
        if self.nodes > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values, aliases expanded "
                                 f"(line {line})")
        if self.chars > MAX_EXPANDED_CHARS:
            # A long string aliased many times: small to read, huge once written again.
            raise yaml.YAMLError(f"more than {MAX_EXPANDED_CHARS} characters of text, "
                                 f"aliases expanded (line {line})")
        if self.depth + levels > self.max_depth:
            raise yaml.YAMLError(f"nesting deeper than {self.max_depth} levels")
        if self.open:
            self.open[-1][2] = max(self.open[-1][2], levels)

    def _close(self) -> None:
        anchor, before, below, chars_before = self.open.pop()
        self.depth -= 1
        if self.open:
            self.open[-1][2] = max(self.open[-1][2], below + 1)
        if anchor is not None:
            self.anchors[anchor] = (self.nodes - before, below + 1, self.chars - chars_before)


def _check_events(text: str, max_depth: int, allow_aliases: bool = False) -> None:
    budget = _EventBudget(max_depth, allow_aliases)
    for event in yaml.parse(text, Loader=_SafeLoader):
        budget.take(event)


# libyaml's emitter when PyYAML has it (its wheels do): about 6 times faster than
# PyYAML's own, which is most of a task file write, and it escapes the line breaks (NEL,
# LS, PS, CR) that PyYAML's own writes raw inside quoted or literal scalars, where a
# reader turns them into other characters.
if TYPE_CHECKING:  # the stubs name both; the checker sees the one interface they share
    _SafeDumper = yaml.SafeDumper
else:
    _SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _TaskDumper(_SafeDumper):
    """Multi-line strings (instructions) as literal blocks, readable by humans; never an
    anchor or alias (the reader refuses them), even for an object used twice."""

    def ignore_aliases(self, _data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> bytes:
    return yaml.dump(document, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True,
                     width=2**16).encode()
