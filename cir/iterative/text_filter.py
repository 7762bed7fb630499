"""The filter every generated modification text passes before it becomes a training triplet: empty, too long,
identical to the original text, or a refusal are rejected, and each reason is counted so the run can log it."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# Phrases by which chat models decline or say they see no change; such a text would teach the retriever nothing.
REFUSAL_PATTERNS = (
    r"\bi(?: a|')?m sorry\b", r"\bsorry\b", r"\bi can ?not\b", r"\bi can't\b", r"\bi am unable\b", r"\bunable to\b",
    r"\bas an ai\b", r"\bi don't know\b", r"\bcannot (?:determine|tell|see|help)\b", r"\bno (?:visible )?(?:difference|change)s?\b",
    r"\b(?:images|pictures) are (?:identical|the same)\b", r"\bnothing to change\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
REASONS = ("empty", "too_long", "identical", "refusal")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: 'Make it RED.' and 'make it red' are identical."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class TextFilter:
    max_words: int = 30
    counts: Counter = field(default_factory=Counter)

    def check(self, text: str, original: str) -> str | None:
        """The reason `text` is rejected, or None when it is kept (counted either way)."""
        reason = self._reason(text, original)
        self.counts[reason or "kept"] += 1
        return reason

    def _reason(self, text: str, original: str) -> str | None:
        norm = normalise(text)
        if not norm:
            return "empty"
        if len(norm.split()) > self.max_words:
            return "too_long"
        if norm == normalise(original):
            return "identical"
        if _REFUSAL.search(text):
            return "refusal"
        return None

    def summary(self) -> dict[str, int]:
        """{'kept': n, 'rejected': n, 'rejected_<reason>': n} for every reason, zeros included."""
        rejected = sum(self.counts[r] for r in REASONS)
        return {"kept": self.counts["kept"], "rejected": rejected, **{f"rejected_{r}": self.counts[r] for r in REASONS}}
