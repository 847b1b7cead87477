"""Which policies judge a chat message, by its role: one rule for the proxy and the LiteLLM route.

An instruction hidden in a tool result or a retrieved document (a web page an agent reads,
an email) is where prompt injection does its damage; an operator's system prompt is not
user input. So by default:

========================  =====================================================
role                      policies
========================  =====================================================
``user``                  ``@guard``: ``UNIGUARD_GUARD_POLICIES``
``tool``, ``function``    ``prompt_injection`` (tool and function results)
``retrieved``             ``prompt_injection``: messages a request marks as retrieved
                          documents (header ``x-uniguard-retrieved``), on top of their
                          role's policies
``system``, ``developer`` not judged (the operator's instructions)
``assistant``             ``@output``: ``UNIGUARD_OUTPUT_POLICIES`` (else the guard policies)
``*``                     any other role: ``@guard`` (an unknown role is untrusted)
========================  =====================================================

``UNIGUARD_ROLE_POLICIES`` (JSON) changes it: its entries replace the defaults' for the
roles it names, e.g. ``{"tool": ["prompt_injection", "content_safety"], "system": ["@guard"]}``;
``[]`` stops judging a role. ``UNIGUARD_GUARD_ROLES`` (the setting before this one) still
works: each role it lists is judged under ``@guard``, whatever the map says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

GUARD = "@guard"  # UNIGUARD_GUARD_POLICIES
OUTPUT = "@output"  # UNIGUARD_OUTPUT_POLICIES, else the guard policies
ANY_ROLE = "*"  # the entry for roles the map does not name
RETRIEVED = "retrieved"  # the entry for messages a request marks as retrieved documents
INJECTION = "prompt_injection"

DEFAULT_ROLE_POLICIES: dict[str, list[str]] = {
    "user": [GUARD],
    "tool": [INJECTION],
    "function": [INJECTION],
    RETRIEVED: [INJECTION],
    "system": [],
    "developer": [],
    "assistant": [OUTPUT],
    ANY_ROLE: [GUARD],
}


@dataclass(frozen=True)
class RolePolicies:
    """The role map with ``@guard`` / ``@output`` expanded: role -> policy ids (empty: not judged)."""

    by_role: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(
        cls,
        role_policies: Mapping[str, Sequence[str]],
        guard_policies: Sequence[str],
        output_policies: Sequence[str] | None,
        guard_roles: Sequence[str] | None = None,
    ) -> RolePolicies:
        merged: dict[str, list[str]] = {**DEFAULT_ROLE_POLICIES, **{k: list(v) for k, v in role_policies.items()}}
        for role in guard_roles or ():
            merged[role] = [GUARD]
        aliases = {GUARD: tuple(guard_policies), OUTPUT: tuple(output_policies or guard_policies)}
        by_role = {}
        for role, entries in merged.items():
            ids: list[str] = []
            for entry in entries:
                ids += aliases.get(entry, (entry,))
            by_role[role] = tuple(dict.fromkeys(ids))
        return cls(by_role)

    @classmethod
    def of(cls, settings: Settings) -> RolePolicies:
        s = settings
        return cls.build(s.role_policies, s.guard_policies, s.output_policies, s.guard_roles)

    def for_role(self, role: str, retrieved: bool = False) -> tuple[str, ...]:
        """The policies a message of ``role`` (lower-case) is judged under; a message marked as a
        retrieved document adds the ``retrieved`` entry's (marking never judges less)."""
        ids = self.by_role.get(role)
        if ids is None:
            ids = self.by_role.get(ANY_ROLE, ())
        if retrieved:
            ids = tuple(dict.fromkeys((*ids, *self.by_role.get(RETRIEVED, ()))))
        return ids


def parse_retrieved(value: str | None) -> frozenset[int]:
    """The message indexes of an ``x-uniguard-retrieved`` header (``"2,5"``); ValueError if unreadable."""
    if value is None or not value.strip():
        return frozenset()
    out = set()
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit() or len(part) > 9:
            raise ValueError(f"{part!r} is not a message index")
        out.add(int(part))
    return frozenset(out)
