"""A user's own constraint, registered by name in the user's module (not lipgan's): what a
worker process of `compare --jobs N` / `study` must import to build it (test_sweep,
test_compare)."""

from __future__ import annotations

from lipgan import constraints


@constraints.register("test-user-clip")
class UserClip(constraints.WeightClip):
    """Weight clipping at ``c`` under the user's own name (a WeightClip subclass: it trains)."""

    def __init__(self, c: float = 0.05) -> None:
        super().__init__(c=c)

