"""Every hub model the MIR stage loads gets its load dtype from core.device, as `dtype` (the keyword of
transformers v5 and diffusers from 0.40; bf16 for a GPU, fp32 on the CPU). The loaders are replaced by
recorders, so no weights are read."""
from __future__ import annotations

import types

import pytest
import torch


class _Stub:
    """Stands in for a loaded model or pipeline: moves nowhere, says what it is."""

    config = types.SimpleNamespace(model_type="qwen2_vl")

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass


def _recorder(calls: list[dict]):
    def from_pretrained(name, **kwargs):
        calls.append(kwargs)
        return _Stub()

    return from_pretrained


@pytest.mark.parametrize("device, dtype", [(torch.device("cuda"), torch.bfloat16), (torch.device("cpu"), torch.float32)])
def test_hub_loads_pass_their_librarys_dtype_keyword(device, dtype, monkeypatch):
    import diffusers
    import transformers

    from core.vlm import ChatVLM
    from mir.generator import DiffusersGenerator
    from mir.refiner import LLMRefiner

    calls: dict[str, list[dict]] = {"diffusers": [], "causal": [], "vlm": []}
    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", _recorder(calls["diffusers"]))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _recorder(calls["causal"]))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", _recorder(calls["vlm"]))
    processor = types.SimpleNamespace(chat_template="{{ messages }}", tokenizer=types.SimpleNamespace(padding_side="right"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda name, **kw: processor)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, **kw: transformers.Qwen2VLConfig())

    DiffusersGenerator("org/tiny-sd", device=device)
    LLMRefiner("org/tiny-lm", tokenizer=object(), device=device)
    ChatVLM.from_pretrained("org/tiny-vlm", device=device)
    assert calls == {"diffusers": [{"dtype": dtype}], "causal": [{"dtype": dtype}], "vlm": [{"dtype": dtype}]}
