"""Incremental detokenisation and stop-string handling for one output row.

Decoding the whole output after every token costs O(n) per step and, for byte-level or
SentencePiece vocabularies, a single token can be half a UTF-8 character or carry a leading
space that only appears in context. So each row keeps two offsets into its ids (the idea
used by vLLM and TGI): text is produced by decoding a short window and subtracting the
window's already-emitted prefix, and nothing is produced while the window ends in a
partial character. Text that could be the start of a stop string is held back from
streaming until it is clear it is not one.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
# A partial UTF-8 character spans at most 4 bytes, so after this many undecodable tokens the
# replacement character is real (the model produced invalid bytes) and is let through.
MAX_PENDING_TOKENS = 4


class RowText:
    """Token ids and text of one generated sequence, grown one token at a time."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far (stop string trimmed once found)
        self.emitted = 0  # characters of `text` already handed to the caller
        self.stopped = False  # a stop string was found
        self._prefix_offset = 0  # window start: ids decoded only to measure the already-emitted text
        self._read_offset = 0  # ids before this are reflected in `text`
        self._decode = fast_decoder(tokenizer)

    def add(self, token_id: int) -> bool:
        """Append one id; True when a stop string now appears (the text is then cut before it)."""
        self.token_ids.append(token_id)
        ids = self.token_ids
        prefix = self._decode(ids[self._prefix_offset:self._read_offset])
        full = self._decode(ids[self._prefix_offset:])
        pending = len(ids) - self._read_offset
        if len(full) > len(prefix) and (not full.endswith(REPLACEMENT) or pending >= MAX_PENDING_TOKENS):
            old_len = len(self.text)
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            return self._find_stop(old_len)
        return False

    def flush(self) -> None:
        """At the end, take in whatever the window still holds back (even a broken character)."""
        if self._read_offset < len(self.token_ids) and not self.stopped:
            prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset:])
            old_len = len(self.text)
            self.text += full[len(prefix):]
            self._read_offset = len(self.token_ids)
            self._find_stop(old_len)

    def _find_stop(self, old_len: int) -> bool:
        """Search only the new text (plus an overlap) so the check stays O(new) per step."""
        best = -1
        for s in self.stop:
            pos = self.text.find(s, max(0, old_len - len(s) + 1))
            if pos != -1 and (best == -1 or pos < best):
                best = pos
        if best == -1:
            return False
        self.text = self.text[:best]
        self.stopped = True
        return True

    def delta(self, final: bool = False) -> str:
        """New text since the last call, holding back a tail that might begin a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stop_prefix_len()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def fast_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer when that is
    the same thing (a fast tokenizer without space clean-up): ~1.6 us a call instead of ~8, twice
    per token per row."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
