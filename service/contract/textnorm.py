"""What a prompt looks like to the model: Unicode folded, hidden payloads surfaced.

Part of the input contract (``service.contract.policy``): training builds its inputs through the
same functions, so a fold added here is seen by both sides.

- NFKC turns fullwidth letters (``ｉｇｎｏｒｅ``), ligatures and other compatibility forms
  into the letters the (uncased English) tokenizer knows; without it they are ``[UNK]``
  and an injection written in them is invisible.
- Common confusables (Cyrillic and Greek letters that look Latin) are folded to Latin,
  but only inside words that mix them with Latin letters: ``ignоre`` with a Cyrillic
  ``о`` is an evasion, a word written wholly in Cyrillic is Russian and stays as it is.
- Zero-width and bidi control characters are dropped: they split words for the
  tokenizer while being invisible to a reader.
- Base64 runs that decode to readable UTF-8 text are returned by ``hidden_payloads`` so
  that the encoder scores them as extra windows; a blob that decodes to bytes (an image,
  a key) yields nothing, so it is not suspicious for being base64. Every readable payload
  is returned (none is skipped for being the ninth), and base64 broken by spaces or line
  breaks (``aWdu b3Jl``) is found as one run.
- Unicode tag characters (U+E0020-E007E, invisible in most renderers) spell ASCII: they
  are mapped to the letters they spell; the tag begin/cancel characters are dropped.

Cost is linear in the text: runs of combining marks (and characters that decompose into
them) are cut to ``MAX_COMBINING_RUN`` before NFKC, whose canonical reordering is
quadratic in a run's length; NFKC runs over pieces of ``PIECE_CHARS`` characters (cut
before an ASCII character, where no composition crosses) so a thread doing it lets others
run between pieces; ``normalize_bounded`` stops as soon as the normalised text exceeds a
budget (NFKC can make 18 characters of one), before anything is tokenised.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import unicodedata

# Cyrillic and Greek letters drawn like Latin ones (Unicode confusables.txt, the common
# subset seen in evasion attempts); the fold applies only in mixed-script words.
_CONFUSABLES = {
    # Cyrillic lower / upper
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɡ": "g",
    "А": "A", "В": "B", "Е": "E", "Ё": "E", "Һ": "H", "І": "I", "Ї": "I", "Ј": "J", "К": "K", "М": "M",
    "Н": "H", "О": "O", "Р": "P", "С": "C", "Ѕ": "S", "Т": "T", "У": "Y", "Х": "X", "Ԁ": "D", "Ԛ": "Q",
    "Ԝ": "W",
    # Greek lower / upper
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
}  # fmt: skip
_FOLD = str.maketrans(_CONFUSABLES)
_INVISIBLE = dict.fromkeys(
    [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD, 0x180E, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_WORD = re.compile(r"\w+")
_LATIN = re.compile(r"[A-Za-z]")
# Base64 (standard or URL-safe) of at least 16 characters (12 bytes), padding optional.
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
# Runs of base64-alphabet tokens separated by whitespace (possessive: linear, no backtracking).
_BASE64_BROKEN = re.compile(r"(?<!\S)[A-Za-z0-9+/_-]++={0,2}+(?:[ \t\r\n]++[A-Za-z0-9+/_-]++={0,2}+)++")
_PLAIN_WORD = re.compile(r"[A-Z]?[a-z]+")
_WHITESPACE = re.compile(r"[ \t\r\n]+")
# Payloads scored each on its own windows; the rest are scored together (joined by newlines).
MAX_PAYLOADS = 8
# Unicode tag characters spell ASCII (U+E0041 is a tagged "A"); begin/cancel tags are dropped.
_TAGS = {cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)} | {0xE0001: None, 0xE007F: None}
# Longest run of non-starters kept (Unicode's stream-safe format allows 30 between starters).
MAX_COMBINING_RUN = 30
PIECE_CHARS = 16384
_ASCII = re.compile(r"[\x00-\x7f]")


class NormalizedTooLong(ValueError):
    """The normalised text is longer than the budget it was given."""

    def __init__(self, chars: int, limit: int) -> None:
        super().__init__(f"normalised text exceeds {limit} characters (at least {chars})")
        self.chars = chars
        self.limit = limit


@functools.cache
def _combining_run() -> re.Pattern[str]:
    """Runs of more than MAX_COMBINING_RUN characters that are, or decompose into, non-starters
    (built once, on the first non-ASCII text: ~0.2 s over every code point)."""
    marks = []
    for cp in range(0x80, 0x110000):
        ch = chr(cp)
        if unicodedata.combining(ch):
            marks.append(cp)
            continue
        mapping = unicodedata.decomposition(ch).split()
        if mapping and mapping[0].startswith("<"):
            mapping = mapping[1:]
        if mapping and unicodedata.combining(chr(int(mapping[0], 16))):
            marks.append(cp)
    ranges = []
    start = prev = marks[0]
    for cp in marks[1:]:
        if cp != prev + 1:
            ranges.append((start, prev))
            start = cp
        prev = cp
    ranges.append((start, prev))
    cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[{cls}]{{{MAX_COMBINING_RUN + 1},}}")


def _safe_cut(ch: str) -> bool:
    """Whether NFKC never composes ``ch`` with what comes before it: it decomposes to a
    starter that no canonical composition takes as its second character."""
    first = unicodedata.normalize("NFKD", ch)[:1] or ch
    return (
        not unicodedata.combining(first)
        and not unicodedata.category(first).startswith("M")
        and not 0x1160 <= ord(first) <= 0x11FF  # Hangul vowel and trailing jamo compose with what precedes
    )


def _piece_end(text: str, end: int) -> int:
    """A cut at or after ``end`` where normalising the two sides apart gives the same text:
    before an ASCII character near ``end``, else before the next character that is safe."""
    near = _ASCII.search(text, end, end + 256)
    if near is not None:
        return near.start()
    for i in range(end, min(len(text), end + 4 * MAX_COMBINING_RUN + 256)):
        if _safe_cut(text[i]):
            return i
    return min(len(text), end + PIECE_CHARS)  # no safe cut in sight (jamo soup): cut anyway, bounded


def _cut_run(match: re.Match[str]) -> str:
    return match.group(0)[:MAX_COMBINING_RUN]


def _fold_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if word.isascii() or not _LATIN.search(word):
        return word
    return word.translate(_FOLD)


def normalize_text(text: str) -> str:
    """NFKC, tag characters spelled out, invisible characters removed, confusables folded in
    mixed-script words; linear in the length of ``text``."""
    return normalize_bounded(text, None)


def normalize_bounded(text: str, limit: int | None) -> str:
    """``normalize_text`` that raises NormalizedTooLong as soon as the result would exceed
    ``limit`` characters (None: no limit), piece by piece, before the rest is normalised."""
    if text.isascii():
        if limit is not None and len(text) > limit:
            raise NormalizedTooLong(len(text), limit)
        return text  # NFKC, the tags, invisibles and confusables leave ASCII alone
    text = _combining_run().sub(_cut_run, text.translate(_TAGS))
    pieces = []
    size = 0
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            end = _piece_end(text, end)
        piece = unicodedata.normalize("NFKC", text[start:end]).translate(_INVISIBLE)
        size += len(piece)
        if limit is not None and size > limit:
            raise NormalizedTooLong(size, limit)
        pieces.append(piece)
        start = end
    out = "".join(pieces)
    if out.isascii():
        return out
    return _WORD.sub(_fold_word, out)


def _readable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    # Mostly printable and mostly words: random bytes decode to UTF-8 rarely, and then not to text.
    if printable < 0.95 * len(text) or letters < 0.5 * len(text) or " " not in text.strip():
        return None
    return text


def _decode(run: str) -> str | None:
    """The readable text a base64 run decodes to, None if it is not one."""
    if len(run) < 16 or run.isalpha() or run.isdigit():  # one long word or number, not an encoding
        return None
    core = run.rstrip("=")
    padded = core + "=" * (-len(core) % 4)
    try:
        data = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _readable(data)


def _broken_runs(text: str) -> list[tuple[int, int, str]]:
    """(start, end, decoded) of base64 broken by whitespace: a run of base64-alphabet tokens,
    plain words at either end left out (with one of them kept, in case it was a chunk)."""
    found = []
    for match in _BASE64_BROKEN.finditer(text):
        tokens = _WHITESPACE.split(match.group(0))
        lo, hi = 0, len(tokens)
        while lo < hi and _PLAIN_WORD.fullmatch(tokens[lo]):
            lo += 1
        while hi > lo and _PLAIN_WORD.fullmatch(tokens[hi - 1]):
            hi -= 1
        if hi - lo < 1:
            continue
        before, after = max(lo - 1, 0), min(hi + 1, len(tokens))
        for a, b in ((lo, hi), (before, hi), (lo, after), (before, after)):
            if b - a < 2:
                continue
            decoded = _decode("".join(tokens[a:b]))
            if decoded is not None:
                found.append((match.start(), match.end(), decoded))
                break
    return found


def hidden_payloads(text: str) -> list[str]:
    """Every readable text hidden as base64 in ``text`` (whole runs, or runs broken by
    whitespace), normalised, in order, each distinct text once."""
    found = _broken_runs(text)
    spans = [(a, b) for a, b, _ in found]
    for match in _BASE64.finditer(text):
        if any(a <= match.start() < b for a, b in spans):  # a line of a broken run found whole
            continue
        decoded = _decode(match.group(0))
        if decoded is not None:
            found.append((match.start(), match.end(), decoded))
    found.sort(key=lambda f: f[0])
    return list(dict.fromkeys(normalize_text(decoded) for _, _, decoded in found))
