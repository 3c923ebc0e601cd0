"""The exceptions the engine raises, and the few a stage raises to steer it.

The hierarchy::

    PipelineError                  root of everything the engine raises
    ├── ConfigError                bad config or bad pipeline definition; nothing ran
    ├── StageError                 one item failed in one stage (carries stage and key)
    │   ├── StageTimeout           the attempt outlived the stage's ``timeout``
    │   └── StageMisuse            the callable broke the stage contract
    ├── ResourceError              a shared resource (a database, a pool) failed to open
    └── SourceError                the source itself failed; the run fails loudly

    TransientError                 raised by a stage: "this attempt may succeed if retried"
    ├── Overloaded                 ... the downstream is saturated (429, 503, too many connections)
    └── RetryAfter                 ... and pause the whole stage for ``delay`` seconds first

    Skip                           raised by a stage: the item ends as skipped, not failed

``TransientError`` and ``Skip`` are not ``PipelineError``\\ s: stages raise them, the engine
consumes them. Third-party errors are translated at one boundary per built-in stage and chained
with ``raise ... from exc``, so an operator always sees the stage and the item key.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PipelineError",
    "ResourceError",
    "Overloaded",
    "RetryAfter",
    "Skip",
    "SourceError",
    "StageError",
    "StageMisuse",
    "StageTimeout",
    "TransientError",
]


class PipelineError(Exception):
    """Root of every error the engine raises."""


class ConfigError(PipelineError):
    """The configuration or the pipeline definition is invalid; nothing has run.

    Args:
        message: A full sentence naming the bad value and the fix.
        file: The config file, when the pipeline came from TOML.
        location: Where in the config, for example ``stages[2].concurrency``.
    """

    def __init__(self, message: str, *, file: str | None = None, location: str | None = None):
        self.message = message
        self.file = file
        self.location = location
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.location) if part)
        return f"{where}: {self.message}" if where else self.message


class StageError(PipelineError):
    """One item failed in one stage.

    Args:
        message: What went wrong, as a full sentence.
        stage: The stage's name.
        key: The item's key, or ``None`` when the item had none.
    """

    def __init__(self, message: str, *, stage: str, key: object = None):
        self.stage = stage
        self.key = key
        super().__init__(message)


class StageTimeout(StageError, TimeoutError):
    """One attempt took longer than the stage's ``timeout``."""


class StageMisuse(StageError):
    """The stage's callable broke the stage contract (for example a sync callable
    that returned a coroutine)."""


class ResourceError(PipelineError):
    """A shared resource, such as a database pool, could not be opened or used."""


class SourceError(PipelineError):
    """The source raised while being read. The run stops reading and fails."""


class TransientError(Exception):
    """Raise from a stage to say that this attempt failed but a retry may succeed.

    It is in every stage's default list of retryable exceptions.
    """


class Overloaded(TransientError):
    """Raise from a stage when the downstream says it is saturated: HTTP 429 or 503, MySQL
    "too many connections".

    It is retried like any :class:`TransientError`, and adaptive limits
    (``concurrency = "auto"``) count it as a loss signal and cut the stage's cap.
    """


class RetryAfter(Overloaded):
    """Raise from a stage to pause the whole stage, not only this item, then retry.

    Every worker of the stage waits until the pause is over before it starts another
    attempt. Built for HTTP 429 and 503 answers with ``Retry-After``.

    Args:
        delay: Seconds to pause the stage for.
        message: Why, for the dead-letter record if the item runs out of attempts.
    """

    def __init__(self, delay: float, message: str = ""):
        self.delay = max(0.0, float(delay))
        super().__init__(message or f"asked to retry after {self.delay:g}s")


class Skip(Exception):
    """Raise from a stage to end the item as skipped (not failed).

    Args:
        reason: Why the item was skipped; kept in the stage's statistics.
    """

    def __init__(self, reason: str = ""):
        self.reason = reason
        super().__init__(reason)
