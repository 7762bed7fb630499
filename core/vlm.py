"""A transformers image-text-to-text chat model behind one call: `chat(images_per_item, prompts) -> answers`.

Used wherever a vision-language model reads pictures and writes text (the MIR simulated user, the iterative-CIR
foundation models). Any checkpoint `AutoModelForImageTextToText` knows loads by hub name or local path —
Qwen2-VL (`Qwen2VLForConditionalGeneration`), Gemma-3 (`Gemma3ForConditionalGeneration`), LLaVA
(`LlavaForConditionalGeneration`), ... — with its `AutoProcessor` and the processor's chat template. Device and
precision come from core.device (bf16 weights and autocast on CUDA, fp32 on CPU); the dtype goes to
`from_pretrained`, never to a global default. No fallback: a model that fails to load or to generate stops the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from core.device import autocast, get_device, pretrained_dtype_kwargs
from core.errors import InputError

# Model types trained on one image per turn: callers paste a pair side by side (`side_by_side`) instead.
SINGLE_IMAGE_TYPES = ("llava", "llava_next")


class ChatVLM:
    """A chat VLM and its processor: one user turn per item, its images first, then the prompt."""

    def __init__(self, model: torch.nn.Module, processor: Any, source: str, max_new_tokens: int = 32,
                 num_beams: int = 1, do_sample: bool = False, device: torch.device | None = None):
        if getattr(processor, "chat_template", None) is None:
            raise InputError(source, "chat_template", "the processor has no chat template; a chat VLM is needed")
        self.device = device or get_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        # Batched generation appends after the prompt, so prompts are padded on the left.
        self.processor.tokenizer.padding_side = "left"
        self.source, self.max_new_tokens, self.num_beams, self.do_sample = source, max_new_tokens, num_beams, do_sample
        self.model_type = getattr(model.config, "model_type", "")

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | None = None, **kwargs: Any) -> "ChatVLM":
        """Any image-text-to-text checkpoint by hub name or local folder (Qwen2-VL, Gemma-3, LLaVA, ...)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig

        if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
            raise InputError(name_or_path, "vlm", "VLM folder not found")
        # Both checks come before the weights load: a wrong name should cost seconds, not a multi-GB download.
        config = AutoConfig.from_pretrained(name_or_path)
        if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            raise InputError(name_or_path, "model_type", f"{config.model_type!r} is not a vision-language (image-text-to-text) "
                                                         "model; a chat VLM such as Gemma-3 or Qwen2-VL is needed")
        processor = AutoProcessor.from_pretrained(name_or_path)
        if getattr(processor, "chat_template", None) is None:
            raise InputError(name_or_path, "chat_template", "the processor has no chat template; a chat VLM is needed")
        device = device or get_device()
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **pretrained_dtype_kwargs(device))
        return cls(model, processor, name_or_path, device=device, **kwargs)

    @property
    def multi_image(self) -> bool:
        """Whether one turn may hold several images (False: show a pair with `side_by_side`)."""
        return self.model_type not in SINGLE_IMAGE_TYPES

    @staticmethod
    def messages(n_images: int, prompt: str) -> list[dict[str, Any]]:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def chat_text(self, n_images: int, prompt: str) -> str:
        """The prompt as the model reads it (the processor's chat template, generation prompt added)."""
        return self.processor.apply_chat_template(self.messages(n_images, prompt), tokenize=False,
                                                  add_generation_prompt=True)

    @torch.no_grad()
    def chat(self, images_per_item: Sequence[Sequence[Image.Image]], prompts: Sequence[str],
             max_new_tokens: int | None = None, seed: int = 0) -> list[str]:
        """One answer per item: the item's images (at least one) and its prompt in one user turn."""
        if len(images_per_item) != len(prompts):
            raise ValueError(f"{len(images_per_item)} image lists but {len(prompts)} prompts")
        if not prompts:
            return []
        if any(len(ims) == 0 for ims in images_per_item):
            raise ValueError("every item needs at least one image")
        if not self.multi_image and any(len(ims) > 1 for ims in images_per_item):
            raise ValueError(f"{self.model_type} reads one image per turn; paste the images with side_by_side")
        texts = [self.chat_text(len(ims), p) for ims, p in zip(images_per_item, prompts)]
        images = [[im.convert("RGB") for im in ims] for ims in images_per_item]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                add_special_tokens=needs_special_tokens(self.processor.tokenizer, texts[0]))
        inputs = inputs.to(self.device)
        # Sampling draws from torch's global RNG; a forked RNG keeps the seed's effect local to this call.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.device):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                      num_beams=self.num_beams, do_sample=self.do_sample)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def needs_special_tokens(tokenizer: Any, chat_text: str) -> bool:
    """Whether tokenizing a chat-template text should add BOS: not when the template wrote it already (Gemma's
    does, Qwen's and LLaVA's do not); a doubled BOS shifts every position the model was trained on."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and chat_text.startswith(bos))


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Both images at the height of the taller one, left then right, on one canvas."""
    height = max(left.height, right.height)
    scaled = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in (left, right)]
    canvas = Image.new("RGB", (scaled[0].width + scaled[1].width, height))
    canvas.paste(scaled[0], (0, 0))
    canvas.paste(scaled[1], (scaled[0].width, 0))
    return canvas
