"""URLs in messages: a presigned URL's query string (X-Amz-Signature, sig=...) and its user:password are
credentials, so neither is ever logged or reported (the issue's rule; GitLab Runner and Buildkite mask the same)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "url_secrets"]


def redact_url(url: str) -> str:
    """`url` without credentials: `https://host:port/path?[REDACTED]`, user info dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "[an unparsable URL]"
    if ":" in host:
        host = f"[{host}]"
    path = "/".join(segment.split(";")[0] + (";[REDACTED]" if ";" in segment else "") for segment in parts.path.split("/"))
    return urlunsplit((parts.scheme, host + port, path, "[REDACTED]" if parts.query else "", ""))


def url_secrets(url: str) -> list[str]:
    """The parts of `url` a message must not show (for a Redactor): its query string, each query value, its
    user info. Values shorter than 4 characters are left out (they would redact ordinary words)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    secrets = [url]
    if parts.query:
        secrets.append(parts.query)
        secrets += [pair.split("=", 1)[1] for pair in parts.query.split("&") if "=" in pair]
    for segment in parts.path.split("/"):
        if ";" in segment:  # path parameters: ;jsessionid=... carries sessions
            secrets += [param.split("=", 1)[-1] for param in segment.split(";")[1:]]
    if parts.username:
        secrets.append(parts.username)
    if parts.password:
        secrets.append(parts.password)
    return [s for s in secrets if len(s) >= 4]
