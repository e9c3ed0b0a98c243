"""The KV cache's name across the transformers versions this package supports (see setup.cfg).

transformers 5.2x renamed the cache argument of every forward and ``generate``, and the matching output field, from
``past_key_values`` to ``cache``; the old name still works there with a FutureWarning, and is the only name in
older releases (5.17 on the GPU image). Everything in drrl-gym that passes or reads a cache goes through these
three helpers, so one place decides which name the installed release uses. The check looks at the output
dataclass's fields rather than at version numbers, so it follows the feature, not the release notes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

LEGACY_CACHE_ARGUMENT = "past_key_values"
CACHE_ARGUMENT = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else LEGACY_CACHE_ARGUMENT


def cache_argument(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` under the installed release's name: ``model(ids, **cache_argument(cache), use_cache=True)``."""
    return {CACHE_ARGUMENT: cache}


def pop_cache(arguments: dict[str, Any]) -> Cache | None:
    """Remove and return the cache from a forward's bound arguments, under either name (callers may use both)."""
    current = arguments.pop(CACHE_ARGUMENT, None)
    legacy = arguments.pop(LEGACY_CACHE_ARGUMENT, None)
    if current is not None and legacy is not None and current is not legacy:
        raise ValueError(f"two different caches were passed ({CACHE_ARGUMENT}= and {LEGACY_CACHE_ARGUMENT}=). "
                         f"Fix: pass only {CACHE_ARGUMENT}=.")
    return current if current is not None else legacy


def output_cache(output: Any) -> Cache | None:
    """The cache a forward returned (``output.cache`` or ``output.past_key_values``, whichever the release has)."""
    return getattr(output, CACHE_ARGUMENT)
