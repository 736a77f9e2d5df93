"""Prompt validation: what may be sent to an agent, checked before anything runs.

A rejected prompt is the caller's fault, not the service's: it is never
retried, never cached and never counted by the breaker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from ralph_supervisor.errors import PromptRejected

DEFAULT_MAX_PROMPT_BYTES = 1024 * 1024


class PromptPolicy:
    """The limits of resources.max_prompt_length and security.blocked_patterns."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        blocked_patterns: Sequence[str] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self.blocked = [re.compile(pattern) for pattern in blocked_patterns]

    @classmethod
    def from_config(cls, config: object) -> PromptPolicy:
        resources = getattr(config, "resources", None)
        security = getattr(config, "security", None)
        return cls(
            getattr(resources, "max_prompt_length", DEFAULT_MAX_PROMPT_BYTES),
            getattr(security, "blocked_patterns", ()),
        )

    def validate(self, prompt: object) -> str:
        """The prompt as it will be sent, or PromptRejected with the reason.

        NUL characters are removed: they cannot cross argv, and no agent
        means anything by them.
        """
        if not isinstance(prompt, str):
            raise PromptRejected(f"a prompt must be text, not {type(prompt).__name__}")

        if not prompt.strip():
            raise PromptRejected("the prompt is empty")

        try:
            encoded = prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PromptRejected(
                f"the prompt is not valid Unicode text at character {error.start} "
                "(a lone surrogate cannot be encoded as UTF-8)"
            ) from None

        if len(encoded) > self.max_bytes:
            raise PromptRejected(
                f"the prompt is {len(encoded)} bytes, over resources.max_prompt_length "
                f"({self.max_bytes} bytes)"
            )

        cleaned = prompt.replace("\0", "")
        if not cleaned.strip():
            raise PromptRejected("the prompt is empty once NUL characters are removed")

        for pattern in self.blocked:
            if pattern.search(cleaned):
                raise PromptRejected(
                    f"the prompt matches security.blocked_patterns entry {pattern.pattern!r}"
                )

        return cleaned


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
