"""What the property-based tests share: hypothesis settings and the success-or-one-line-error check."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from toolkit.errors import MegaforgeError


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible in CI (derandomized), no per-example deadline on a loaded machine."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def outcome(fn, *args, **kwargs):
    """``fn(*args)``'s result, or the MegaforgeError it raised (whose message must be one line);
    any other exception propagates and fails the property."""
    try:
        return fn(*args, **kwargs)
    except MegaforgeError as e:
        message = str(e)
        assert message.strip(), f"empty {type(e).__name__} message"
        assert "\n" not in message and "\r" not in message, f"multi-line {type(e).__name__}: {message!r}"
        return e
