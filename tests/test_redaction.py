import base64
import json
import threading
import urllib.parse

import pytest

from cluster_agent.redaction import MIN_ENCODED_LENGTH, REPLACEMENT, Redactor

# Every character class that changes under some encoding: quote, backslash, space, '/', '+', non-ASCII, apostrophe.
TOKEN = "tok\"en\\with sp/ace+é'ü-0123456789"


def _b64_forms(data: bytes) -> list[str]:
    forms = []
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(data).decode()
        forms += [encoded, encoded.rstrip("=")]
    return forms


ENCODED_FORMS = {
    "raw": TOKEN,
    "json": json.dumps(TOKEN)[1:-1],
    "json, not ensure_ascii": json.dumps(TOKEN, ensure_ascii=False)[1:-1],
    "json, slashes escaped (PHP)": json.dumps(TOKEN)[1:-1].replace("/", "\\/"),
    "json, upper-case \\u escapes": json.dumps(TOKEN)[1:-1].replace("\\u00e9", "\\u00E9"),
    "repr": repr(TOKEN)[1:-1],
    "repr inside a string with both quotes": repr('"' + TOKEN)[2:-1],
    "ascii": ascii(TOKEN)[1:-1],
    "repr of bytes": repr(TOKEN.encode())[2:-1],
    "repr of the json echo": repr(json.dumps(TOKEN)[1:-1])[1:-1],
    "json of the repr": json.dumps(repr(TOKEN))[2:-2],
    "quote, safe=''": urllib.parse.quote(TOKEN, safe=""),
    "quote, default safe": urllib.parse.quote(TOKEN),
    "quote_plus": urllib.parse.quote_plus(TOKEN),
    "quote, lower-case hex": urllib.parse.quote(TOKEN, safe="").lower(),
    "hex": TOKEN.encode().hex(),
    "HEX": TOKEN.encode().hex().upper(),
    **{f"base64 #{i}": form for i, form in enumerate(_b64_forms(TOKEN.encode()))},
}


@pytest.fixture
def redactor():
    return Redactor([TOKEN])


@pytest.mark.parametrize("form", ENCODED_FORMS.values(), ids=ENCODED_FORMS.keys())
def test_every_encoded_form_is_redacted(redactor, form):
    text = f"HTTP 500 {{\"echo\": \"{form}\"}} and more"
    redacted = redactor.redact(text)
    assert form not in redacted and REPLACEMENT in redacted
    assert redacted.startswith("HTTP 500 ") and redacted.endswith(" and more")


@pytest.mark.parametrize("prefix", [b"user:", b"user0:", b"user01:", b"", b"x", b"xy"])
@pytest.mark.parametrize("suffix", [b"", b"!", b"!?", b"!?*"])
def test_the_secret_inside_a_larger_base64_blob_is_redacted_at_every_alignment(redactor, prefix, suffix):
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        blob = encode(prefix + TOKEN.encode() + suffix).decode()
        redacted = redactor.redact(f"Authorization: Basic {blob}")
        assert REPLACEMENT in redacted
        # Left: the neighbours' own characters, at most 2 mixed ones at each edge, and the padding.
        left = len(redacted) - len("Authorization: Basic ") - len(REPLACEMENT)
        assert left <= 4 * (len(prefix) + len(suffix)) // 3 + 2 + 2 + 2


def test_http_basic_credentials_are_redacted():
    password = "registry-pass+/w0rd"
    redactor = Redactor([password])
    header = "Basic " + base64.b64encode(f"robot$builder:{password}".encode()).decode()
    # Only the user name's own characters (and one that mixes its last bits with the password's) are left.
    assert redactor.redact(f"pull failed with {header!r}") == f"pull failed with 'Basic cm9ib3QkYnVpbGRlcjp{REPLACEMENT}'"


def test_innocent_text_is_untouched(redactor):
    text = ("2026-01-01 00:00:00 INFO cluster_agent: job j-1 finished in 1.5 s; tok en with sp ace, "
            "aGVsbG8gd29ybGQ=, %20%2B, 746f6b, \\u00e9, 'quoted' \"double\"")
    assert redactor.redact(text) == text


def test_short_secrets_are_matched_raw_only():
    redactor = Redactor(["abcde"])  # at least 4, under MIN_ENCODED_LENGTH: raw only
    assert len("abcde") < MIN_ENCODED_LENGTH
    assert redactor.redact("x abcde y") == f"x {REPLACEMENT} y"
    innocent = f"{base64.b64encode(b'abcde').decode()} {b'abcde'.hex()}"
    assert redactor.redact(innocent) == innocent


def test_too_short_and_empty_secrets_are_ignored():
    redactor = Redactor([None, "", "abc"])
    assert len(redactor) == 0
    assert redactor.redact("abc abc") == "abc abc"


def test_the_longest_form_wins_so_no_padding_or_tail_is_left(redactor):
    padded = base64.b64encode(TOKEN.encode()).decode()
    assert padded.endswith("=")
    assert redactor.redact(f"<{padded}>") == f"<{REPLACEMENT}>"


def test_several_secrets_and_adding_later():
    redactor = Redactor(["first-secret"])
    assert redactor.redact("first-secret second-secret") == f"{REPLACEMENT} second-secret"
    redactor.add("second-secret")
    redactor.add("second-secret")  # again: no-op
    assert len(redactor) == 2
    assert redactor.redact("first-secret second-secret") == f"{REPLACEMENT} {REPLACEMENT}"


def test_regex_metacharacters_in_a_secret_are_literal():
    redactor = Redactor(["a.b*c(d)[e]$"])
    assert redactor.redact("aXbbbc(d)[e]$") == "aXbbbc(d)[e]$"
    assert redactor.redact("a.b*c(d)[e]$") == REPLACEMENT


def test_one_shared_redactor_is_safe_across_threads():
    redactor = Redactor()
    secrets = [f"thread-secret-{i:03d}" for i in range(16)]
    errors: list[BaseException] = []

    def work(secret: str) -> None:
        try:
            redactor.add(secret)
            for _ in range(50):
                assert secret not in redactor.redact(f"x {secret} y")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(secret,)) for secret in secrets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(redactor) == len(secrets)
    assert redactor.redact(" ".join(secrets)) == " ".join([REPLACEMENT] * len(secrets))


def test_a_stream_redacts_a_secret_split_across_chunks_in_any_form():
    import base64

    from cluster_agent.redaction import RedactingOutput

    secret = "s3cr3t-Value-42"
    redactor = Redactor([secret])
    for text in (f"before {secret} after", f"b64 {base64.b64encode(secret.encode()).decode()} end"):
        data = text.encode()
        for cut in range(1, len(data)):
            out: list[bytes] = []
            stream = RedactingOutput(out.append, redactor)
            stream(data[:cut])
            stream(data[cut:])
            stream.flush()
            joined = b"".join(out).decode()
            assert "[REDACTED]" in joined and secret not in joined, (cut, joined)


def test_a_stream_without_secrets_passes_through_at_once():
    from cluster_agent.redaction import RedactingOutput

    out: list[bytes] = []
    stream = RedactingOutput(out.append, Redactor())
    stream(b"hello")
    assert out == [b"hello"]


def test_a_stream_redacts_a_secret_whose_character_is_split_between_chunks():
    """A block-buffered writer cuts anywhere, inside a UTF-8 character too: decoded alone, each half was a lone
    surrogate and the secret went out in the clear."""
    from cluster_agent.redaction import RedactingOutput

    secret = "pässwörd-secret"
    for cut, sent in streamed_at_every_cut(f"leak:{secret} end\n".encode(), [secret]):
        assert sent == b"leak:[REDACTED] end\n", cut
    # Bytes that are no UTF-8 at all still come out unchanged, an incomplete character at the end too.
    out = []
    stream = RedactingOutput(out.append, Redactor([secret]))
    stream(b"\xff\xfe ok \xc3")
    stream.flush()
    assert b"".join(out) == b"\xff\xfe ok \xc3"


def test_a_number_that_is_a_secret_is_redacted_in_json():
    redactor = Redactor(["4111111111111111"])
    assert redactor.redact_json({"pin": 4111111111111111, "n": 42, "flag": True, "text": "4111111111111111"}) == {
        "pin": REPLACEMENT, "n": 42, "flag": True, "text": REPLACEMENT}


def test_many_secrets_are_compiled_once(monkeypatch):
    import cluster_agent.redaction as redaction

    builds = []
    real = redaction._compile
    monkeypatch.setattr(redaction, "_compile", lambda secrets: builds.append(1) or real(secrets))
    redactor = Redactor([f"secret-number-{n:04d}" for n in range(100)])
    assert builds == [1] and len(redactor) == 100
    redactor.add_all(["secret-number-0001", None, "x"])  # nothing new: no build
    assert builds == [1]


def test_a_scope_is_redacted_while_attached_and_never_by_redact_own():
    agent = Redactor(["agent-token-123456"])
    job = Redactor(["Summer2024!"])
    agent.attach(job)
    line = "guess:Summer2024! agent-token-123456"
    assert agent.redact(line) == f"guess:{REPLACEMENT} {REPLACEMENT}"
    assert agent.redact_json({"k": line}) == {"k": f"guess:{REPLACEMENT} {REPLACEMENT}"}
    assert agent.redact_own(line) == f"guess:Summer2024! {REPLACEMENT}"  # what another job's result gets
    assert agent.secrets == {"agent-token-123456"}
    agent.detach(job)
    assert agent.redact(line) == f"guess:Summer2024! {REPLACEMENT}"  # gone with the job: nothing piles up


def test_the_stream_holds_back_the_longest_form_a_secret_can_take():
    """A 4-byte character is 16 characters in a bytes repr (\\xf0\\x9f\\x98\\x80): a hold of 12 per character let
    that form out whole when a chunk ended just before its end."""

    secret = "😀😀😀😀😀😀"
    form = repr(secret.encode())[2:-1]
    assert len(form) == 96 and Redactor([secret]).stream_hold() >= 96
    for cut, sent in streamed_at_every_cut(f"log: {form} end".encode(), [secret]):
        assert sent == b"log: [REDACTED] end", cut


def test_small_chunks_are_scanned_in_batches_not_each_time(monkeypatch):
    from cluster_agent.redaction import RedactingOutput

    redactor = Redactor(["s3cr3t-Value-42"])
    scans = []
    real = redactor.redact_stream
    monkeypatch.setattr(redactor, "redact_stream", lambda text, hold, covered=0: scans.append(len(text)) or real(text, hold, covered))
    out: list[bytes] = []
    stream = RedactingOutput(out.append, redactor)
    for _ in range(1000):
        stream(b"x\n")
    stream(b"s3cr3t-")
    stream(b"Value-42 done\n")
    stream.flush()
    joined = b"".join(out)
    assert joined == b"x\n" * 1000 + b"[REDACTED] done\n"
    assert len(scans) <= 2 * 2014 // (redactor.stream_hold() // 2) + 2  # a scan per half hold, not per chunk


def test_a_secret_printed_back_to_back_streams_out_as_it_comes():
    """Each match released once it ends before the cut: nothing piles up however long the run of secrets."""
    from cluster_agent.redaction import RedactingOutput

    secret = "s3cr3tTOKENvalue"
    out: list[bytes] = []
    stream = RedactingOutput(out.append, Redactor([secret]))
    for _ in range(5000):
        stream(secret.encode())
    assert len(stream._pending) <= Redactor([secret]).stream_hold() + len(secret)
    stream.flush()
    assert b"".join(out) == b"[REDACTED]" * 5000


def test_a_stream_is_closed_by_its_flush_and_a_late_chunk_is_dropped():
    """A reader that fell behind the job's end may still feed after the flush: the flush redacted the held text
    as a whole, so a late chunk could carry the rest of a secret cut there."""
    from cluster_agent.redaction import RedactingOutput

    secret = "Q7zK9pLm2Xv4Rt8Wb"
    out: list[bytes] = []
    stream = RedactingOutput(out.append, Redactor([secret]))
    stream(b"x" + secret[:8].encode())
    stream.flush()
    stream(secret[8:].encode() + b" tail")
    stream.flush()
    assert b"".join(out) == b"x" + secret[:8].encode()  # a part alone is no secret; the rest never went out


def test_a_huge_integer_in_a_result_is_no_error():
    redactor = Redactor(["4111111111111111"])
    huge = 10**400
    assert redactor.redact_json({"x": huge, "pin": 4111111111111111}) == {"x": huge, "pin": REPLACEMENT}


def test_a_numeric_secret_is_redacted_whatever_form_the_number_takes():
    redactor = Redactor(["0.00001234", "1.5E+300", "12345678901234567890"])
    assert redactor.redact_json([1.234e-05, 1.5e300, 12345678901234567890, 1.2345678901234567e19, 7]) == [
        REPLACEMENT, REPLACEMENT, REPLACEMENT, REPLACEMENT, 7]


def test_keys_that_redact_alike_keep_both_values():
    redactor = Redactor(["SECRETA1", "SECRETA2", "SECRETA3"])
    assert redactor.redact_json({"SECRETA1": 1, "SECRETA2": 2, "SECRETA3": 3, "plain": 4}) == {
        REPLACEMENT: 1, f"{REPLACEMENT}#2": 2, f"{REPLACEMENT}#3": 3, "plain": 4}


def test_overlapping_secrets_leave_no_part_of_either():
    redactor = Redactor(["alpha-beta-gamma", "gamma-delta-epsilon"])
    assert redactor.redact("x alpha-beta-gamma-delta-epsilon y") == f"x {REPLACEMENT} y"
    assert Redactor(["abcdefgh-1234", "defgh-1"]).redact("abcdefgh-1234!") == f"{REPLACEMENT}!"  # one inside the other


def test_overlapping_secrets_in_a_stream_leave_no_part_and_hold_little():
    """A chain of two overlapping secrets, as long as the job likes: every cut redacts it, and the held text stays
    within two holds (merging through the cut would hold the whole chain, and scan it again at each chunk)."""
    from cluster_agent.redaction import RedactingOutput

    secrets = ["alpha-beta-gamma-7Q", "gamma-7Q-delta-epsilon-Z9"]
    for cut, sent in streamed_at_every_cut(b"x alpha-beta-gamma-7Q-delta-epsilon-Z9 y\n", secrets):
        joined = sent.decode()
        assert "delta" not in joined and "alpha" not in joined and joined.startswith("x [REDACTED]"), (cut, joined)
    redactor = Redactor(["a" * 20, "a" * 21])
    out = []
    stream = RedactingOutput(out.append, redactor)
    for _ in range(2000):
        stream(b"a" * 50)
        assert len(stream._pending) <= redactor.stream_hold() + 100
    stream.flush()
    joined = b"".join(out)  # one run of secrets, one replacement; a leftover shorter than either is no secret
    assert joined.startswith(REPLACEMENT.encode()) and joined.count(REPLACEMENT.encode()) == 1
    assert set(joined[len(REPLACEMENT):]) <= {ord("a")} and len(joined) - len(REPLACEMENT) < 20


def test_a_real_key_keeps_its_name_beside_renamed_redacted_ones():
    redactor = Redactor(["SECRETA1", "SECRETA2", "SECRETA3"])
    assert redactor.redact_json({"SECRETA1": 1, "SECRETA2": 2, f"{REPLACEMENT}#2": "real", "SECRETA3": 3}) == {
        REPLACEMENT: 1, f"{REPLACEMENT}#3": 2, f"{REPLACEMENT}#2": "real", f"{REPLACEMENT}#4": 3}


def streamed_at_every_cut(data: bytes, secrets: list[str]):
    """(cut, what a stream sent) for `data` written in two chunks split at each byte."""
    from cluster_agent.redaction import RedactingOutput

    for cut in range(1, len(data)):
        out: list[bytes] = []
        stream = RedactingOutput(out.append, Redactor(secrets))
        stream(data[:cut])
        stream(data[cut:])
        stream.flush()
        yield cut, b"".join(out)
