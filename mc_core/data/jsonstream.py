"""Reading a large JSON object one member at a time, in bounded memory.

The release files of the real benchmarks are single JSON documents: GQA's question files are one
object ``{question_id: record}`` (train-balanced: 943k questions, about 1 GB), VQAv2's are an
object holding one long array (``{"annotations": [...], ...}``). ``json.load`` holds every record
as Python objects at once, several times the file's size; :func:`iter_object` yields the
top-level members one by one instead, each decoded by ``json.JSONDecoder.raw_decode`` from a
text window of about ``chunk`` characters, so memory is one record plus the window.

``dict(iter_object(path))`` equals ``json.load(open(path))`` for any valid file (a repeated name
keeps its last value in the first position, as ``json.load`` does). A file that is not a JSON
object, is truncated or malformed raises ``ValueError`` naming the file and the character
position (0-based, as ``json``'s ``char``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["CHUNK", "iter_object"]

CHUNK = 1 << 20  # characters read at a time
_SPACE = re.compile(r"[ \t\n\r]*")
# How close to the window's end a value may end, or a decoding error be, and still mean "read
# more": the longest token that can be cut is a literal (``-Infinity``) or a ``\uXXXX`` escape.
_CUT_MARGIN = 10
_FOUND = {
    "": "the end of the file",
    "[": "an array",
    '"': "a string",
    "t": "true",
    "f": "false",
    "n": "null",
}


class _Window:
    """A sliding text window over a file: the unread rest of the last chunks."""

    def __init__(self, f: IO[str], path: str, chunk: int):
        self.f, self.path, self.chunk = f, path, chunk
        self.text = ""
        self.pos = 0  # next unread character of ``text``
        self.base = 0  # characters of the file before ``text``
        self.eof = False
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        """Appends the next chunk (at least as long as the window, so a long value is read in
        O(its length)); drops the read part. False at the end of the file."""
        if self.eof:
            return False
        try:
            data = self.f.read(max(self.chunk, len(self.text) - self.pos))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{self.path}: not UTF-8 text after character {self.base + len(self.text)}: {err}"
            ) from None
        if not data:
            self.eof = True
            return False
        self.base += self.pos
        self.text = self.text[self.pos :] + data
        self.pos = 0
        return True

    def fail(self, msg: str, at: int | None = None) -> ValueError:
        at = self.base + self.pos if at is None else at
        return ValueError(f"{self.path}: {msg} at character {at}")

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c:
            raise self.fail(f"the file ends early (expected {what})")
        if c not in chars:
            raise self.fail(f"expected {what}, found {c!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decodes the next JSON value, reading more of the file while it is cut off."""
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                unterminated = err.msg.startswith("Unterminated string")
                if (unterminated or err.pos >= len(self.text) - _CUT_MARGIN) and self.more():
                    continue
                ends = unterminated or not self.text[err.pos :].strip()
                what = "the file ends inside a value" if ends else "not valid JSON"
                raise self.fail(f"{what} ({err.msg})", self.base + err.pos) from None
            # A number near the window's end may go on in the next chunk ("-0" of "-0.5E-10").
            if end > len(self.text) - _CUT_MARGIN and self.more():
                continue
            self.pos = end
            return value


def _found(c: str) -> str:
    if c in _FOUND:
        return _FOUND[c]
    return "a number" if c in "-0123456789" else repr(c)


def iter_object(
    path: str | os.PathLike, *, stream: str | None = None, chunk: int = CHUNK
) -> Iterator[tuple[str, Any]]:
    """The members ``(name, value)`` of the JSON object in ``path``, in file order.

    Args:
        path: a UTF-8 file holding one JSON object (whitespace around it allowed).
        stream: the name of a member whose value is an array: it comes as ``(stream,
            elements)``, ``elements`` an iterator decoding them one at a time, to be read before
            the next member (what is left unread is skipped).
        chunk: characters read at a time (tests use tiny ones to cut values anywhere).

    Raises:
        ValueError: naming ``path`` and the character position when the file cannot be read,
            is not a JSON object (or ``stream``'s value not an array), is cut short, is
            malformed, or has anything but whitespace after the object.
    """
    path = str(path)
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115  (closed by the with below)
    except OSError as err:
        raise ValueError(f"{path}: cannot read: {err}") from None
    with f:
        w = _Window(f, path, chunk)
        c = w.peek()
        if c != "{":
            raise w.fail(f"expected a JSON object, found {_found(c)}")
        w.pos += 1
        if w.peek() == "}":
            w.pos += 1
        else:
            while True:
                if w.peek() != '"':
                    raise w.fail(f"expected a member name (a string), found {_found(w.peek())}")
                name = w.value()
                w.expect(":", "':' after the member name")
                if name == stream:
                    elements = _array(w, name)
                    yield name, elements
                    for _ in elements:  # what the caller left unread
                        pass
                else:
                    yield name, w.value()
                if w.expect(",}", "',' or '}' after a member") == "}":
                    break
        if w.peek():
            raise w.fail("extra data after the JSON object")


def _array(w: _Window, name: str) -> Iterator[Any]:
    """The elements of the array starting at the window's position, one by one."""
    if w.peek() != "[":
        raise w.fail(f"expected an array for {name!r}, found {_found(w.peek())}")
    w.pos += 1
    if w.peek() == "]":
        w.pos += 1
        return
    while True:
        yield w.value()
        if w.expect(",]", f"',' or ']' in the array {name!r}") == "]":
            return
