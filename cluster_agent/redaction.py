"""Secret redaction: every known secret, in every form it can take in output, becomes "[REDACTED]".

A secret rarely reaches output as itself. A control plane echoing the token in an error body sends it JSON-escaped
or percent-encoded, an `Authorization: Basic` header carries it base64-encoded inside `user:secret`, and the
agent's own messages quote untrusted text with `!r`. So each secret is matched in all of these forms:

- raw;
- text escapings: JSON (any encoder: short escapes, `\\uXXXX` for any character, `\\/`), Python `repr()`/`ascii()`
  of str and bytes, and each of these applied twice (e.g. the repr of a JSON-escaped echo);
- percent-encoding by any encoder (any safe set, `+` or `%20` for a space, either hex case);
- base64, standard and URL-safe, padded or not, and embedded in a larger blob (see `_base64_forms`);
- hex, either case.

The rule on length: a secret shorter than `MIN_SECRET_LENGTH` is not redacted at all, and only secrets of at least
`MIN_ENCODED_LENGTH` characters get the encoded forms. Short strings are common in innocent text, and their
encodings shorter still (an embedded base64 form is a few characters shorter than the secret): redacting them would
mask ordinary output while protecting nothing worth the name. Real tokens are far longer.

All forms of a secret are one compiled regular expression, longest alternative first (so a full padded base64
form wins over its unpadded core at the same position), built when the secret is added. `redact()` takes each
secret's matches one after another and merges those of different secrets that overlap (see `_spans`).
"""

from __future__ import annotations

import base64
import codecs
import json
import math
import re
import threading
from typing import Any, Callable, Iterable

__all__ = ["RedactingOutput", "Redactor"]

REPLACEMENT = "[REDACTED]"
MIN_SECRET_LENGTH = 4
MIN_ENCODED_LENGTH = 6


class Redactor:
    """The set of secrets to hide, shared by everything that writes output (logs, job results, streamed logs).

    Thread-safe: `add_all()` builds a new pattern under a lock and publishes it with one assignment; `redact()` reads
    that one reference and takes no lock, so it never waits on an `add()` and stays cheap on every log line.

    Scopes: the log formatter's redactor also hides the secrets of each running job, which `attach()`es its own
    Redactor while it runs and `detach()`es it at its end. An attached scope takes part in `redact()` (so in
    `redact_json()`) only; `secrets`, `redact_own()`, `stream_hold()` and `redact_stream()` are this redactor's
    own. A job's result is redacted with the agent's own secrets (`redact_own()`) and that job's, never another
    job's: otherwise one tenant's output could test guesses at another's secrets by watching for "[REDACTED]".
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._patterns: tuple[re.Pattern[str], ...] = ()  # one per secret: every form of it
        self._longest = 0  # the longest text any form of any secret can take
        self._numbers: frozenset[float] = frozenset()  # the secrets that are numbers, as numbers
        self._scopes: tuple[Redactor, ...] = ()
        self.add_all(secrets)

    def add(self, secret: str | None) -> None:
        """Hide `secret` from now on; None, empty and too-short values are ignored (see the module's rule)."""
        self.add_all([secret])

    def add_all(self, secrets: Iterable[str | None]) -> None:
        """Hide each of `secrets` from now on: one pattern build for all of them (a build costs time linear in the
        total length of all secrets, so adding them one by one would cost the square)."""
        new = {secret for secret in secrets if secret and len(secret) >= MIN_SECRET_LENGTH}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets |= new
            self._patterns, self._longest = _compile(self._secrets)
            self._numbers = frozenset(n for n in map(_as_number, self._secrets) if n is not None)

    def attach(self, scope: Redactor) -> None:
        """Also hide `scope`'s secrets in `redact()` until `detach(scope)`."""
        with self._lock:
            self._scopes = (*self._scopes, scope)

    def detach(self, scope: Redactor) -> None:
        with self._lock:
            self._scopes = tuple(s for s in self._scopes if s is not scope)

    def redact(self, text: str) -> str:
        """`text` with every form of every secret (attached scopes' too) replaced by REPLACEMENT."""
        text = self.redact_own(text)
        for scope in self._scopes:
            text = scope.redact(text)
        return text

    def redact_own(self, text: str) -> str:
        """`text` with every form of this redactor's own secrets replaced, not its scopes'. Two secrets that overlap
        in the text (one's end is the other's start) become one REPLACEMENT: replacing one alone would leave the
        rest of the other in clear."""
        if not self._patterns:
            return text
        out, last = [], 0
        for start, end in _spans(self._patterns, text):
            out += [text[last:start], REPLACEMENT]
            last = end
        out.append(text[last:])
        return "".join(out)

    def __len__(self) -> int:
        return len(self._secrets)

    @property
    def secrets(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._secrets)

    def stream_hold(self) -> int:
        """How many trailing characters of a stream must wait for the next chunk: the longest text any form of any
        secret can take (measured on the forms themselves: a 4-byte character is 16 in a bytes repr)."""
        longest = self._longest
        return longest + 8 if longest else 0

    def redact_stream(self, text: str, hold: int, covered: int = 0) -> tuple[str, str, int]:
        """Split a stream's pending `text` into what may go out now, redacted, and what must wait for more: the last
        `hold` characters (a form starting before them fits whole in `text`, so its match is final). Returns
        (ready, pending, covered): a match that starts before the cut and runs past it goes out as REPLACEMENT, and
        the first `covered` characters of `pending` are its rest, to be replaced by the next call (which writes no
        second REPLACEMENT for them). The cut never moves back, so the held text stays one hold long however long
        a run of overlapping secrets is."""
        cut = max(0, len(text) - hold)
        if not self._patterns:
            return text[:cut], text[cut:], 0
        spans = _spans(self._patterns, text)
        if covered:
            spans = _merged([(0, min(covered, len(text))), *spans])
        out: list[str] = []
        last = 0
        rest = 0
        for start, end in spans:
            if start >= cut:
                break
            if not (covered and start == 0):  # the rest of a match the last call already replaced
                out += [text[last:start], REPLACEMENT]
            last = min(end, cut)
            rest = max(0, end - cut)
        out.append(text[last:cut])
        return "".join(out), text[cut:], rest

    def redact_json(self, value: Any) -> Any:
        """Every string (keys too) of a JSON value, redacted; a number whose digits hold a secret (a PIN given as a
        secret and printed unquoted) becomes the REPLACEMENT string."""
        if not self._patterns and not self._scopes:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = json.dumps(value)
            return REPLACEMENT if self.redact(text) != text or self._hides_number(value) else value
        if isinstance(value, list):
            return [self.redact_json(item) for item in value]
        if isinstance(value, dict):
            # Two keys that redact alike keep both values: the keys redaction left alone keep their names, then the
            # changed ones are numbered ("[REDACTED]", "[REDACTED]#2", ...), skipping names already taken.
            keys = {key: self.redact(key) if isinstance(key, str) else key for key in value}
            redacted: dict[Any, Any] = {key: None for key, new_key in keys.items() if new_key == key}
            names: dict[Any, Any] = {key: key for key in redacted}
            seen: dict[Any, int] = {}
            for key, new_key in keys.items():
                if key in names:
                    continue
                name = new_key
                while name in redacted:
                    seen[new_key] = seen.get(new_key, 1) + 1
                    name = f"{new_key}#{seen[new_key]}"
                redacted[name] = None
                names[key] = name
            return {names[key]: self.redact_json(item) for key, item in value.items()}
        return value

    def _hides_number(self, value: float) -> bool:
        # A secret "0.00001234" is the number 1.234e-05 once a job's JSON encoder wrote it.
        try:
            number = float(value)
        except OverflowError:  # an integer past a double's range: its digits were checked as text
            return False
        return number in self._numbers or any(scope._hides_number(value) for scope in self._scopes)


class RedactingOutput:
    """A job's output stream with its secrets redacted, whatever the chunks: a secret split across two chunks is
    found, because each chunk's tail waits for the next one (`flush()` sends the rest at the end)."""

    def __init__(self, sink: Callable[[bytes], None], redactor: Redactor) -> None:
        self._sink = sink
        self._redactor = redactor
        self._pending = ""
        # A character split between two chunks must be decoded whole, or a secret holding it would be two lone
        # surrogates that no pattern matches: the incremental decoder keeps an incomplete sequence for the next
        # chunk. Bytes that are not UTF-8 at all become surrogates and are written back unchanged.
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._fresh = 0  # characters that arrived since the held text was last scanned
        self._covered = 0  # leading characters of the held text that are the rest of a match already replaced
        # The reader thread feeds; the job's thread flushes once the job was judged, possibly while a reader that
        # fell behind still feeds. After the flush the stream is closed: a late chunk is dropped, never sent with
        # a secret cut at the flush.
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            hold = self._redactor.stream_hold()
            if not hold:
                self._sink(data)
                return
            text = self._decoder.decode(data)
            self._pending += text
            self._fresh += len(text)
            if self._fresh < hold // 2:
                # Each scan reads all the held text: scanning it for every small chunk (a job printing a line every
                # few milliseconds) would cost its length per chunk. Wait for half a hold of new text.
                return
            self._fresh = 0
            ready, self._pending, self._covered = self._redactor.redact_stream(self._pending, hold, self._covered)
            if ready:
                self._sink(ready.encode("utf-8", "surrogateescape"))

    def flush(self) -> None:
        """Send what was held back, redacted as a whole, and close the stream."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            rest = self._pending + (self._decoder.decode(b"", final=True) if self._redactor.stream_hold() else "")
            ready, _, _ = self._redactor.redact_stream(rest, 0, self._covered)
            self._pending, self._fresh, self._covered = "", 0, 0
            if ready:
                self._sink(ready.encode("utf-8", "surrogateescape"))


# --- patterns ----------------------------------------------------------------------------------------------------


def _compile(secrets: Iterable[str]) -> tuple[tuple[re.Pattern[str], ...], int]:
    """A pattern per secret, of every form of it, and the longest text one of them can match."""
    patterns, longest = [], 0
    for secret in sorted(secrets):
        # Ordered by the length of text each alternative matches, longest first; the pattern string breaks ties so
        # the order (hence the regex) is the same on every run.
        alternatives: dict[str, int] = {}
        for regex, length in _patterns(secret):
            alternatives[regex] = max(length, alternatives.get(regex, 0))
        ordered = sorted(alternatives, key=lambda regex: (-alternatives[regex], regex))
        patterns.append(re.compile("|".join(ordered)))
        longest = max(longest, *alternatives.values())
    return tuple(patterns), longest


def _spans(patterns: tuple[re.Pattern[str], ...], text: str) -> list[tuple[int, int]]:
    """(start, end) of what to replace in `text`: each secret's matches one after another, and matches of different
    secrets that overlap merged into one span. Only overlapping ones merge, never adjacent ones: a secret printed
    back to back stays a run of separate spans. Linear in the text for each secret: no search restarts inside a
    match."""
    if len(patterns) == 1:
        return [match.span() for match in patterns[0].finditer(text)]
    return _merged(sorted(match.span() for pattern in patterns for match in pattern.finditer(text)))


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted `spans` with the overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _as_number(secret: str) -> float | None:
    try:
        number = float(secret)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _patterns(secret: str) -> list[tuple[str, int]]:
    """(regex, length of the text it matches, or the longest such) for each form of `secret`."""
    if len(secret) < MIN_ENCODED_LENGTH:
        return [(re.escape(secret), len(secret))]
    literals = _escaped_forms(secret)
    data = secret.encode("utf-8", "surrogatepass")
    literals |= _base64_forms(data)
    patterns = [(re.escape(form), len(form)) for form in literals if form]
    patterns.append((_json_any_encoder(secret), sum(_json_longest(char) for char in secret)))
    patterns.append((_percent_any_encoder(secret), 3 * len(data)))
    patterns.append((_any_case_hex(data.hex()), 2 * len(data)))
    return patterns


# Each escaper returns the text between the quotes. repr()/ascii() quote with " when the text contains ' but no ",
# and escape ' otherwise: the secret inside a larger string can get either, so both are forms (the "…" variants
# force the single-quoted one by putting a " in front).
_ESCAPERS: tuple[Callable[[str], str], ...] = (
    lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    lambda s: json.dumps(s)[1:-1],
    lambda s: repr(s)[1:-1],
    lambda s: repr('"' + s)[2:-1],
    lambda s: ascii(s)[1:-1],
    lambda s: ascii('"' + s)[2:-1],
    lambda s: repr(s.encode("utf-8", "surrogatepass"))[2:-1],
    lambda s: repr(b'"' + s.encode("utf-8", "surrogatepass"))[3:-1],
)


def _escaped_forms(secret: str) -> set[str]:
    """The secret, its text escapings, and the escapings of those (an echo is escaped by the server, then by us)."""
    forms = {secret}
    for _ in range(2):
        forms |= {escape(form) for form in forms for escape in _ESCAPERS}
    return forms


_BASE64_ENCODERS = (base64.b64encode, base64.urlsafe_b64encode)
# Base64 turns each 3-byte group into 4 characters. Inside a larger blob (e.g. `user:secret` in HTTP Basic auth) the
# secret starts at offset 0, 1 or 2 of a group, and the characters at its edges mix its bits with its neighbours'.
# Encoding the secret behind `shift` filler bytes puts it at that offset; the leading characters that carry filler
# bits (none, 2 or 3 of the first group) and the trailing ones that would carry the next byte's bits, plus the
# padding, are cut off. What is left depends on the secret's bytes alone, so it appears verbatim in any blob that
# holds the secret at that alignment. The cut characters stay in the output ("dXNlcjp[REDACTED]I="): together they
# carry at most 6 bits of the secret, which is no help to a guesser.
_LEADING_MIXED = (0, 2, 3)  # by shift: characters of the first group that carry filler bits
_TRAILING_MIXED = (0, 3, 2)  # by (shift + length) % 3: the last, partial character and the "=" padding


def _base64_forms(data: bytes) -> set[str]:
    forms: set[str] = set()
    for encode in _BASE64_ENCODERS:
        whole = encode(data).decode("ascii")
        forms |= {whole, whole.rstrip("=")}
        for shift in range(3):
            encoded = encode(b"\0" * shift + data).decode("ascii")
            end = len(encoded) - _TRAILING_MIXED[(shift + len(data)) % 3]
            forms.add(encoded[_LEADING_MIXED[shift]:end])
    return forms


_JSON_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}


def _json_any_encoder(secret: str) -> str:
    """The secret as any JSON encoder may write it: each character as itself, a short escape or `\\uXXXX`.

    Encoders differ (Go escapes `<>&`, PHP escapes `/`, `ensure_ascii` escapes all non-ASCII), so one pattern
    accepts every choice per character rather than listing encoders.
    """
    parts = []
    for char in secret:
        options = [re.escape(char)]
        if char in _JSON_SHORT_ESCAPES:
            options.append(re.escape("\\" + _JSON_SHORT_ESCAPES[char]))
        units = char.encode("utf-16-be", "surrogatepass")
        options.append("".join(
            re.escape("\\u") + _any_case_hex(units[i:i + 2].hex()) for i in range(0, len(units), 2)
        ))
        parts.append(f"(?:{'|'.join(options)})")
    return "".join(parts)


def _json_longest(char: str) -> int:
    return max(1, 2 if char in _JSON_SHORT_ESCAPES else 0, 6 * (len(char.encode("utf-16-be", "surrogatepass")) // 2))


def _percent_any_encoder(secret: str) -> str:
    """The secret as any percent-encoder may write it: each character as itself or its UTF-8 bytes as `%XX`.

    Safe sets differ between encoders and a space may be `+`; accepting both per character covers them all.
    """
    parts = []
    for char in secret:
        encoded = "".join("%" + _any_case_hex(f"{byte:02x}") for byte in char.encode("utf-8", "surrogatepass"))
        options = [re.escape(char), encoded] + ([re.escape("+")] if char == " " else [])
        parts.append(f"(?:{'|'.join(options)})")
    return "".join(parts)


def _any_case_hex(digits: str) -> str:
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in digits.lower())
