"""GenIR's loop as the paper runs it: one chat VLM plays every part of the user, with the target image in view.

- `caption(targets)`: round 0, the VLM describes the target as a prompt a text-to-image model could redraw it from.
- `compare(targets, shown, captions)`: the VLM sees [target, shown image] and says what differs in content. The
  shown image is the generated one (`genir`) or the top-1 retrieved one (`prediction`, whatever it is: GenIR shows
  the top-1 result even once it is the target).
- `critique(targets, captions)`: GenIR's text-only baseline; the VLM reviews the caption against the target.
- `answer(targets, questions)`: the cell-question baseline; the VLM answers the system's question from the target.
- `rewrite(targets, captions, feedback, source)`: the VLM writes the next caption from the old one and the
  feedback, looking at the target again.

The prompts are our own wording of what GenIR's scripts (`genIR_CaptionImageRefinement.py`,
`genIR_CaptionRefinment_TextOnly.py`, `genIR_CaptionRefinment_VIsualPredictionFeedBack.py`) ask for. Every call is
batched over targets through `core.vlm.ChatVLM.chat`; nothing here loads a model (the loop passes one instance).
"""
from __future__ import annotations

import re
from typing import Sequence

from PIL import Image

from core.vlm import ChatVLM, side_by_side

CAPTION_PROMPT = ("Write one detailed caption of this image that a text-to-image model could use to redraw it: the "
                  "objects and people, their colours, where they are, the setting, the lighting and the style. "
                  "Reply with the caption alone, with no introduction.")
# {first}/{second}: how the target and the shown image are laid out (two images, or one canvas in halves).
COMPARE_PROMPTS = {
    "generated": ("The {first} is the image I have in mind. An image generator drew the {second} from this "
                  "description: \"{caption}\". Say what differs in content between the two images. List only the "
                  "differences, briefly and plainly."),
    "retrieved": ("The {first} is the image I am searching for. A search for \"{caption}\" returned the {second} "
                  "instead. Say what differs in content between the two images and what the description should "
                  "add or change to find the {first}. Be brief and plain."),
}
CRITIQUE_PROMPT = ("Here is a description of this image: \"{caption}\". Say what it gets wrong, leaves out or states "
                   "too vaguely for a search engine or an image generator to find or redraw this exact image. "
                   "Reply with the critique alone.")
ANSWER_PROMPT = "Look at this image and answer the question in one short sentence. Question: {question}"
# What the rewriter is told the feedback is, per source.
FEEDBACK_SOURCES = {
    "generated": "An image generated from it differs from this image as follows",
    "retrieved": "The search returned another image, which differs from this image as follows",
    "critique": "A reviewer's critique of it",
    "answer": "The search system asked \"{question}\" and the answer was",
}
REWRITE_PROMPT = ("This is the image I am looking for. My description of it was: \"{caption}\". {source}: "
                  "\"{feedback}\". Write an improved description of this image that fixes these points, as one caption "
                  "for a search engine and an image generator. Reply with the description alone.")
LAYOUTS = {True: ("first image", "second image"), False: ("left half of the picture", "right half of the picture")}


def clean(text: str) -> str:
    """One line: the model's answer with line breaks and surrounding quotes removed."""
    return re.sub(r"\s+", " ", text).strip().strip('"').strip()


class GenIRRoles:
    """The parts of GenIR's user that one chat VLM plays; see the module docstring."""

    def __init__(self, vlm: ChatVLM, model_id: str, caption_max_new_tokens: int = 200, feedback_max_new_tokens: int = 200):
        self.vlm, self.model_id = vlm, model_id
        self.caption_max_new_tokens, self.feedback_max_new_tokens = caption_max_new_tokens, feedback_max_new_tokens

    def _chat(self, images: list[list[Image.Image]], prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
        return [clean(t) for t in self.vlm.chat(images, prompts, max_new_tokens, seed)]

    def caption(self, targets: Sequence[Image.Image], seed: int = 0) -> list[str]:
        return self._chat([[t] for t in targets], [CAPTION_PROMPT] * len(targets), self.caption_max_new_tokens, seed)

    def compare(self, targets: Sequence[Image.Image], shown: Sequence[Image.Image], captions: Sequence[str],
                kind: str, seed: int = 0) -> list[str]:
        """What differs between each target and the image shown for its caption (`kind`: generated | retrieved)."""
        if not len(targets) == len(shown) == len(captions):
            raise ValueError(f"{len(targets)} targets, {len(shown)} shown images, {len(captions)} captions")
        first, second = LAYOUTS[self.vlm.multi_image]
        prompts = [COMPARE_PROMPTS[kind].format(first=first, second=second, caption=c) for c in captions]
        if self.vlm.multi_image:  # the target first, as GenIR shows them
            images = [[t, s] for t, s in zip(targets, shown)]
        else:
            images = [[side_by_side(t, s)] for t, s in zip(targets, shown)]
        return self._chat(images, prompts, self.feedback_max_new_tokens, seed)

    def critique(self, targets: Sequence[Image.Image], captions: Sequence[str], seed: int = 0) -> list[str]:
        prompts = [CRITIQUE_PROMPT.format(caption=c) for c in captions]
        return self._chat([[t] for t in targets], prompts, self.feedback_max_new_tokens, seed)

    def answer(self, targets: Sequence[Image.Image], questions: Sequence[str], seed: int = 0) -> list[str]:
        prompts = [ANSWER_PROMPT.format(question=q) for q in questions]
        return self._chat([[t] for t in targets], prompts, self.feedback_max_new_tokens, seed)

    def rewrite(self, targets: Sequence[Image.Image], captions: Sequence[str], feedback: Sequence[str], source: str,
                questions: Sequence[str] | None = None, seed: int = 0) -> list[str]:
        """The next caption of each target; an empty answer keeps the old caption (the search goes on with it)."""
        questions = list(questions) if questions is not None else [""] * len(captions)
        prompts = [REWRITE_PROMPT.format(caption=c, feedback=f, source=FEEDBACK_SOURCES[source].format(question=q))
                   for c, f, q in zip(captions, feedback, questions)]
        said = self._chat([[t] for t in targets], prompts, self.caption_max_new_tokens, seed)
        return [new or old for new, old in zip(said, captions)]
