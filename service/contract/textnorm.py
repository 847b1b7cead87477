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
  a key) yields nothing, so it is not suspicious for being base64.
"""

from __future__ import annotations

import base64
import binascii
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
MAX_PAYLOADS = 8


def _fold_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if word.isascii() or not _LATIN.search(word):
        return word
    return word.translate(_FOLD)


def normalize_text(text: str) -> str:
    """NFKC, invisible characters removed, confusables folded in mixed-script words."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    if text.isascii():
        return text
    return _WORD.sub(_fold_word, text)


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


def hidden_payloads(text: str) -> list[str]:
    """Readable texts hidden as base64 runs in ``text`` (at most ``MAX_PAYLOADS``, in order)."""
    out: list[str] = []
    for match in _BASE64.finditer(text):
        run = match.group(0)
        if run.isalpha() or run.isdigit():  # one long word or number, not an encoding
            continue
        core = run.rstrip("=")
        padded = core + "=" * (-len(core) % 4)
        try:
            data = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            continue
        decoded = _readable(data)
        if decoded is not None:
            out.append(normalize_text(decoded))
            if len(out) >= MAX_PAYLOADS:
                break
    return out
