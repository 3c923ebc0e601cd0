"""HTTP stages: the download stage (split into modules in the next commit)."""

from ._download import DEFAULT_DEADLINE, DEFAULT_USER_AGENT, DownloadError, download

__all__ = ["DEFAULT_DEADLINE", "DEFAULT_USER_AGENT", "DownloadError", "download"]
