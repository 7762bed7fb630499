"""Foundation models that write a modification text for a (reference, target) image pair, turning a mined hard
negative into a new positive: Qwen2-VL (both images in one multi-image chat turn), LLaVA-style (the two images
side by side in one picture), the project's own MTST generator (`core.modtext`) and, on Shapes, a stand-in that
reads both images' pixels with the scene reader and says what differs (`core.shapes.scene_diff`).
No fallback: a model that fails to load or to generate stops the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from core.device import get_device
from core.errors import InputError
from core.io import json_digest
from core.vlm import ChatVLM, side_by_side
from cir.iterative.manifest import hash_model_source

FOUNDATION_BACKBONES = ("mtst", "qwen2_vl", "llava", "scene_reader")

# The prompt the chat models read; the original text is shown so the model writes a *different* instruction,
# one that fits the hard negative rather than the original target.
PAIR_PROMPT = (
    "{layout} The original modification text for a similar pair was: \"{original}\". Write a short modification "
    "text that changes the reference image into the target image. Answer with the modification text only."
)
QWEN_LAYOUT = "The first image is the reference image and the second image is the target image."
LLAVA_LAYOUT = "The left half of the picture is the reference image and the right half is the target image."


class FoundationModel(Protocol):
    def generate(self, references: Sequence[Image.Image], targets: Sequence[Image.Image],
                 originals: Sequence[str], seed: int) -> list[str]: ...

    def settings(self) -> dict[str, Any]: ...


class _ChatFoundation:
    """A chat VLM (`core.vlm.ChatVLM`); subclasses say how the pair is shown."""

    backbone = ""
    layout = ""
    n_images = 1

    def __init__(self, vlm: ChatVLM, source: str):
        self.vlm, self.source = vlm, source

    @property
    def processor(self) -> Any:
        return self.vlm.processor

    def settings(self) -> dict[str, Any]:
        return foundation_settings(self.backbone, self.source, self.vlm.max_new_tokens, self.vlm.num_beams,
                                   self.vlm.do_sample)

    def prompt(self, original: str) -> str:
        return PAIR_PROMPT.format(layout=self.layout, original=original)

    def _messages(self, original: str) -> list[dict[str, Any]]:
        return ChatVLM.messages(self.n_images, self.prompt(original))

    def _images(self, reference: Image.Image, target: Image.Image) -> list[Image.Image]:
        raise NotImplementedError

    def generate(self, references: Sequence[Image.Image], targets: Sequence[Image.Image],
                 originals: Sequence[str], seed: int) -> list[str]:
        if not (len(references) == len(targets) == len(originals)):
            raise ValueError("one reference, one target and one original text per pair expected")
        images = [self._images(r, t) for r, t in zip(references, targets)]
        return self.vlm.chat(images, [self.prompt(o) for o in originals], seed=seed)

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | None = None, max_new_tokens: int = 24,
                        num_beams: int = 1, do_sample: bool = False) -> "_ChatFoundation":
        vlm = ChatVLM.from_pretrained(path, device=device, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                      do_sample=do_sample)
        return cls(vlm, path)


class Qwen2VLFoundation(_ChatFoundation):
    """Qwen2-VL multi-image chat: reference and target are two images of one user turn."""

    backbone = "qwen2_vl"
    layout = QWEN_LAYOUT
    n_images = 2

    def _images(self, reference: Image.Image, target: Image.Image) -> list[Image.Image]:
        return [reference, target]


class LlavaFoundation(_ChatFoundation):
    """LLaVA sees one image per turn, so the pair is pasted side by side (reference left, target right)."""

    backbone = "llava"
    layout = LLAVA_LAYOUT

    def _images(self, reference: Image.Image, target: Image.Image) -> list[Image.Image]:
        return [side_by_side(reference, target)]


class MTSTFoundation:
    """The project's modification-text generator (`core.modtext`): it reads only the image pair."""

    def __init__(self, generator: Any, source: str, max_new_tokens: int = 24, num_beams: int = 1):
        self.generator, self.source = generator, source
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | None = None, max_new_tokens: int = 24,
                        num_beams: int = 1, do_sample: bool = False) -> "MTSTFoundation":
        if do_sample:
            raise InputError(None, "do_sample", "the MTST generator decodes greedily or by beam search only")
        from core.modtext import load_modification_generator

        return cls(load_modification_generator(path, device=device), path, max_new_tokens, num_beams)

    def settings(self) -> dict[str, Any]:
        return foundation_settings("mtst", self.source, self.max_new_tokens, self.num_beams, False)

    def generate(self, references: Sequence[Image.Image], targets: Sequence[Image.Image],
                 originals: Sequence[str], seed: int) -> list[str]:
        return self.generator.generate(list(references), list(targets), max_new_tokens=self.max_new_tokens,
                                       num_beams=self.num_beams, seed=seed)


class SceneReaderFoundation:
    """Shapes only: the scene reader reads the reference and the target (the mined hard negative) into their grids
    and the text says, in the world's grammar, how to change one into the other. It sees pixels only, as a
    vision-language model would; an empty text (the reader sees no difference) is dropped by the text filter."""

    def __init__(self, comparer: Any, source: str):
        self.comparer, self.source = comparer, source

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | None = None, max_new_tokens: int = 24,
                        num_beams: int = 1, do_sample: bool = False) -> "SceneReaderFoundation":
        from core.shapes.scene_diff import PixelComparer
        from core.shapes.scene_reader import load_reader

        return cls(PixelComparer(load_reader(path), device), path)

    def settings(self) -> dict[str, Any]:
        return foundation_settings("scene_reader", self.source, 0, 1, False)

    def generate(self, references: Sequence[Image.Image], targets: Sequence[Image.Image],
                 originals: Sequence[str], seed: int) -> list[str]:
        return self.comparer.describe(references, targets)


def foundation_settings(backbone: str, path: str, max_new_tokens: int, num_beams: int, do_sample: bool) -> dict[str, Any]:
    """What the generated texts depend on (the manifest's generator entry), known without loading the model."""
    prompt = {"qwen2_vl": [PAIR_PROMPT, QWEN_LAYOUT], "llava": [PAIR_PROMPT, LLAVA_LAYOUT]}.get(backbone)
    return {"backbone": backbone, "model": hash_model_source(path), "max_new_tokens": max_new_tokens,
            "num_beams": num_beams, "do_sample": do_sample, "prompt": json_digest(prompt) if prompt else None}


def load_foundation_model(backbone: str, path: str, device: torch.device | None = None, max_new_tokens: int = 24,
                          num_beams: int = 1, do_sample: bool = False) -> FoundationModel:
    """The foundation model named by `--foundation_model_backbone` from `--foundation_model_path`."""
    check_foundation_args(backbone, path)
    kinds = {"mtst": MTSTFoundation, "qwen2_vl": Qwen2VLFoundation, "llava": LlavaFoundation,
             "scene_reader": SceneReaderFoundation}
    return kinds[backbone].from_pretrained(path, device=device or get_device(), max_new_tokens=max_new_tokens,
                                           num_beams=num_beams, do_sample=do_sample)


def check_foundation_args(backbone: str, path: str) -> None:
    """Checked before any work starts."""
    if backbone not in FOUNDATION_BACKBONES:
        raise InputError("command line", "foundation_model_backbone",
                         f"unknown foundation model {backbone!r}; choose one of {', '.join(FOUNDATION_BACKBONES)}")
    if not path:
        raise InputError("command line", "foundation_model_path", "no foundation model given")
    # A local-looking path must exist; anything else is taken as a hub name (real runs only).
    if (path.startswith((".", "/", "~")) or backbone in ("mtst", "scene_reader")) and not Path(path).expanduser().exists():
        raise InputError(path, "foundation_model_path", "foundation model folder not found")
