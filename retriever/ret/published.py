"""ReT checkpoints in the layout aimagelab publishes them in (Hugging Face: `config.json` + safetensors weights).

A published folder (e.g. `aimagelab/ReT-CLIP-ViT-L-14`) holds the reference's `RetrieverModel` as transformers
saves it: `config.json` (`model_type: retriever`, a `query_config` and a `passage_config`, each a ReT config with
its CLIP `text_config` / `vision_config` and a `layer_strategy`) and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). The weight names are the reference modules' (src/models/ret/modeling_ret.py):

  {side}_model.text_adapter.{i}.* / vision_adapter.{i}.*     per-layer adapters       → {side}.text_adapter.{i}.* ...
  {side}_model.ret_cell.query_hidden_states                  h_0                      → {side}.cell.initial_state
  {side}_model.ret_cell.query_state_ids                      P (fixed sinusoid)       → {side}.cell.slot_ids
  {side}_model.ret_cell.{sa,text_xa,vision_xa,mlp,*_gate_w,xa_ln,text_ln,vision_ln,mlp_ln}.*  → {side}.cell.*
  {side}_model.ret_cell.{input,forget}_gate_bias_prior       b_i, b_f (buffers)       → RetConfig.*_gate_bias_prior
  {side}_model.ret_cell.sa_ln.*                              built but never used by the reference's forward: dropped
  {side}_model.late_proj.weight                              W_late                   → {side}.late_proj.weight
  query_model.text_model.* / query_model.vision_model.*      Hugging Face CLIPTextModel / CLIPVisionModel towers,
                                                             shared with the passage side (share_text/vision_models)

The towers are kept as transformers' CLIP modules rather than converted to open_clip: the checkpoint's own
text/vision configs then set every detail that changes features (QuickGELU for OpenAI's CLIP, GELU for LAION's
OpenCLIP H/G conversions, layer-norm eps, the text attention mask), so the tokens the cell reads are those the
reference computed, with no conversion to get wrong. The tokenizer and image processor are the ones the checkpoint
names (`text_config._name_or_path`, `vision_config._name_or_path`), or the checkpoint folder's own when it has them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from core.errors import InputError
from retriever.ret.model import LAYER_STRATEGIES, FrozenTowers, RetConfig, RetrieverConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SIDES = {"query_model": "query", "passage_model": "passage"}
TOWER_TYPES = {"text": "clip_text_model", "vision": "clip_vision_model"}
# Cell submodules whose weights keep their names (only the prefix changes).
CELL_MODULES = ("sa", "text_xa", "vision_xa", "mlp", "text_input_gate_w", "vision_input_gate_w",
                "text_forget_gate_w", "vision_forget_gate_w", "xa_ln", "text_ln", "vision_ln", "mlp_ln")
UNUSED_CELL_MODULES = ("sa_ln",)  # defined in the reference's RetCell, never called in its forward


def is_published_folder(folder: str | Path) -> bool:
    """A folder in the published layout: a transformers `config.json` of model_type `retriever`."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "retriever"
    except (json.JSONDecodeError, AttributeError):
        return False


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub name (`aimagelab/ReT-CLIP-ViT-L-14`) through huggingface_hub's cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise InputError(path, None, "no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown repository, ...: one clear error, not a traceback from the hub client
        raise InputError(str(name_or_path), None, f"not a local folder, and the hub could not provide it "
                         f"({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Reading the files


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the checkpoint, and the file each one came from (shards included)."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(folder / WEIGHTS_INDEX, "weight_map", "missing or not an object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        raise InputError(folder, None, f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX} beside {CONFIG_FILE}")
    tensors, origin = {}, {}
    for file in files:
        if not file.is_file():
            raise InputError(file, None, "weights shard listed in the index is missing")
        for key, value in load_file(str(file)).items():
            tensors[key], origin[key] = value, file
    return tensors, origin


def _side_config(d: dict, where: str, priors: dict[str, float]) -> RetConfig:
    """The reference's RetConfig (one side) → this project's RetConfig."""
    strategy = d.get("layer_strategy", "clip_vit_b")
    if strategy not in LAYER_STRATEGIES:
        raise InputError(where, "layer_strategy", f"unknown {strategy!r}; known: {', '.join(LAYER_STRATEGIES)}")
    if d.get("activation_fn", "gelu") != "gelu":
        raise InputError(where, "activation_fn", f"{d['activation_fn']!r}: only the reference's default 'gelu' cell "
                         "MLP is implemented")
    if d.get("use_pooler_features", False):
        raise InputError(where, "use_pooler_features", "pooled (single-vector) ReT features are not implemented")
    if not d.get("late_proj_output_size", 128):
        raise InputError(where, "late_proj_output_size", "a checkpoint without the late projection is not supported")
    hidden = int(d.get("hidden_size", 1024))
    heads = int(d.get("num_attention_heads", hidden // 64))
    intermediate = int(d.get("intermediate_size", 4 * hidden))
    if hidden % heads or intermediate % hidden:
        raise InputError(where, "num_attention_heads/intermediate_size",
                         f"{heads} heads / {intermediate} MLP units do not divide hidden_size {hidden}")
    layers = LAYER_STRATEGIES[strategy]
    return RetConfig(text_layers=list(layers["text"]), vision_layers=list(layers["vision"]),
                     num_queries=int(d.get("num_queries", 32)), hidden_size=hidden, head_dim=hidden // heads,
                     mlp_ratio=intermediate // hidden, out_dim=int(d.get("late_proj_output_size", 128)),
                     dropout=float(d.get("dropout_p", 0.05)), attention_dropout=float(d.get("attention_dropout", 0.05)),
                     input_gate_bias_prior=priors.get("input_gate_bias_prior", float(d.get("input_gate_bias_prior", 0.0))),
                     forget_gate_bias_prior=priors.get("forget_gate_bias_prior",
                                                       float(d.get("forget_gate_bias_prior", 0.0))),
                     use_tanh=bool(d.get("use_tanh", False)))


def read_config(folder: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, RetrieverConfig]:
    """config.json → (the raw dict, this project's RetrieverConfig). The gate bias priors are buffers in the
    reference, so the weights' values win over the config's (they are the ones its forward used)."""
    path = folder / CONFIG_FILE
    raw = json.loads(path.read_text())
    query = raw.get("query_config")
    if not isinstance(query, dict):
        raise InputError(path, "query_config", "missing: not a ReT retriever config")
    shared = bool(raw.get("share_query_passage_models", False))
    passage = query if shared else raw.get("passage_config")
    if not isinstance(passage, dict):
        raise InputError(path, "passage_config", "missing (and share_query_passage_models is false)")
    for flag in ("share_text_models", "share_vision_models"):
        if not shared and not raw.get(flag, True):
            raise InputError(path, flag, "separate query and passage towers are not supported: here both sides "
                             "read one pair of frozen towers")
    for kind, model_type in TOWER_TYPES.items():
        tower = query.get(f"{kind}_config")
        if not isinstance(tower, dict) or tower.get("model_type") != model_type:
            got = tower.get("model_type") if isinstance(tower, dict) else tower
            raise InputError(path, f"query_config.{kind}_config.model_type", f"expected {model_type!r}, got {got!r}")
    sides = {}
    for side, d in (("query", query), ("passage", passage)):
        prefix = "query_model" if shared else f"{side}_model"
        priors = {name: float(tensors[f"{prefix}.ret_cell.{name}"])
                  for name in ("input_gate_bias_prior", "forget_gate_bias_prior")
                  if f"{prefix}.ret_cell.{name}" in tensors}
        sides[side] = _side_config(d, f"{path} {side}_config", priors)
    spec = {"hf_clip": {"text_config": query["text_config"], "vision_config": query["vision_config"],
                        "source": str(folder)}}
    # ReT's inference always reads queries as "{instruction} {question}"
    return raw, RetrieverConfig(encoder=spec, query=sides["query"], passage=sides["passage"], use_instruction=True)


# ----------------------------------------------------------------------------------------------------------------
# The towers: transformers' CLIP, behind the interface the cells read (FrozenTowers)


class ShiftedIds:
    """Hugging Face CLIP tokenizer → ids + 1 with 0 marking padding: the towers' interface marks padding by id 0, as
    open_clip does, while CLIP's vocabulary uses 0 for "!" and pads with end-of-text."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.context_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return (enc["input_ids"] + 1) * enc["attention_mask"]


class ClipImageProcessor:
    """A PIL image → the checkpoint's pixel values [3, H, W] (transformers' CLIPImageProcessor)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFClipEncoder(nn.Module):
    """transformers' CLIPTextModel + CLIPVisionModel with their tokenizer and image processor."""

    def __init__(self, text_model: nn.Module, vision_model: nn.Module, tokenizer: Any, image_processor: Any,
                 spec: dict):
        super().__init__()
        self.text_model, self.vision_model = text_model, vision_model
        self.tokenizer = ShiftedIds(tokenizer, int(text_model.config.max_position_embeddings))
        self.preprocess = ClipImageProcessor(image_processor)
        self.spec = spec

    @property
    def image_size(self) -> int:
        return int(self.vision_model.config.image_size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts)


class PublishedTowers(FrozenTowers):
    """The published checkpoints' towers, read as the reference reads them: `hidden_states[1:]` of each."""

    def __init__(self, encoder: HFClipEncoder):
        nn.Module.__init__(self)
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._fingerprint = None

    @property
    def pretrained(self) -> bool:
        return True

    @property
    def text_width(self) -> int:
        return int(self.encoder.text_model.config.hidden_size)

    @property
    def vision_width(self) -> int:
        return int(self.encoder.vision_model.config.hidden_size)

    @property
    def n_text_layers(self) -> int:
        return int(self.encoder.text_model.config.num_hidden_layers)

    @property
    def n_vision_layers(self) -> int:
        return int(self.encoder.vision_model.config.num_hidden_layers)

    @torch.no_grad()
    def text_tokens(self, tokens: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        attention = tokens != 0
        length = int(attention.sum(1).max())
        tokens, attention = tokens[:, :length], attention[:, :length]
        pad = int(self.encoder.tokenizer.tokenizer.pad_token_id)
        ids = torch.where(attention, tokens - 1, torch.full_like(tokens, pad))
        out = self.encoder.text_model(input_ids=ids, attention_mask=attention.long(), output_hidden_states=True)
        states = out.hidden_states[1:]  # [0] is the embedding output; [l + 1] the output of block l
        return torch.stack([states[i] for i in layers], 1), attention

    @torch.no_grad()
    def vision_tokens(self, pixels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        dtype = next(self.encoder.vision_model.parameters()).dtype
        out = self.encoder.vision_model(pixel_values=pixels.to(dtype), output_hidden_states=True)
        states = out.hidden_states[1:]
        return torch.stack([states[i] for i in layers], 1)


def _tower_state(tensors: dict[str, torch.Tensor], prefix: str, inner: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The published tower tensors under `prefix`, renamed for the installed transformers' module: checkpoints
    written by transformers 4.x nest them once more (`text_model.text_model.embeddings...`), 5.x does not."""
    own = set(module.state_dict())
    nested = any(k.startswith(inner + ".") for k in own)
    state = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if not nested and name.startswith(inner + "."):
            name = name[len(inner) + 1:]
        elif nested and not name.startswith(inner + "."):
            name = f"{inner}.{name}"
        if name.rsplit(".", 1)[-1] == "position_ids" and name not in own:
            continue  # a buffer older transformers saved; rebuilt by the module
        state[name] = value
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], file: str | Path, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise InputError(file, what, f"{len(result.missing_keys)} weights missing, e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:  # unreachable after the key check, kept so that a loader change cannot drop weights
        raise InputError(file, what, f"unknown weights {result.unexpected_keys[:5]}")


def _processor_source(folder: Path, tower_config: dict, marker: str, field: str, config_path: Path) -> str:
    if (folder / marker).is_file():
        return str(folder)
    name = tower_config.get("_name_or_path") or tower_config.get("name_or_path")
    if not name:
        raise InputError(config_path, field, f"names no tokenizer / image processor, and the folder has no {marker}")
    return str(name)


def build_published_towers(folder: Path, raw: dict, tensors: dict[str, torch.Tensor],
                           origin: dict[str, Path]) -> PublishedTowers:
    from transformers import (AutoImageProcessor, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModel)

    query = raw["query_config"]
    config_path = folder / CONFIG_FILE
    drop = ("model_type", "_name_or_path", "name_or_path", "transformers_version", "architectures")
    text_cfg = CLIPTextConfig(**{k: v for k, v in query["text_config"].items() if k not in drop})
    vision_cfg = CLIPVisionConfig(**{k: v for k, v in query["vision_config"].items() if k not in drop})
    text_model, vision_model = CLIPTextModel(text_cfg).eval(), CLIPVisionModel(vision_cfg).eval()
    file = origin.get(next((k for k in origin if k.startswith("query_model.text_model.")), ""), folder / WEIGHTS_FILE)
    _load_strict(text_model, _tower_state(tensors, "query_model.text_model.", "text_model", text_model), file,
                 "query_model.text_model")
    _load_strict(vision_model, _tower_state(tensors, "query_model.vision_model.", "vision_model", vision_model), file,
                 "query_model.vision_model")
    sources = {}
    for what, marker, kind in (("tokenizer", "tokenizer_config.json", "text"),
                               ("image processor", "preprocessor_config.json", "vision")):
        sources[what] = _processor_source(folder, query[f"{kind}_config"], marker,
                                          f"query_config.{kind}_config._name_or_path", config_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(sources["tokenizer"])
        processor = AutoImageProcessor.from_pretrained(sources["image processor"])
    except (OSError, ValueError) as e:
        raise InputError(config_path, "query_config.text_config/vision_config._name_or_path",
                         f"cannot open the tokenizer {sources['tokenizer']!r} or image processor "
                         f"{sources['image processor']!r} the checkpoint names ({e})") from None
    spec = {"hf_clip": {"text_config": query["text_config"], "vision_config": query["vision_config"],
                        "tokenizer": sources["tokenizer"], "image_processor": sources["image processor"],
                        "source": str(folder)}}
    return PublishedTowers(HFClipEncoder(text_model, vision_model, tokenizer, processor, spec))


# ----------------------------------------------------------------------------------------------------------------
# The cells


def cell_key(name: str) -> str | None:
    """A published per-side weight name (after `{side}_model.`) → this project's name under the side; None for
    the reference's unused modules. Raises KeyError for a name this map does not know."""
    parts = name.split(".")
    if parts[0] in ("text_adapter", "vision_adapter") or name == "late_proj.weight":
        return name
    if parts[0] == "ret_cell" and len(parts) > 1:
        if name == "ret_cell.query_hidden_states":
            return "cell.initial_state"
        if parts[1] in CELL_MODULES:
            return "cell." + ".".join(parts[1:])
        if parts[1] in UNUSED_CELL_MODULES:
            return None
    raise KeyError(name)


def split_weights(tensors: dict[str, torch.Tensor], origin: dict[str, Path], shared: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the cells' state dict in this project's names, the fixed slot ids per side). Every key must be known:
    the unknown ones are one InputError naming their file."""
    cells, slot_ids, unknown = {}, {}, []
    buffers = ("ret_cell.input_gate_bias_prior", "ret_cell.forget_gate_bias_prior")
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix == "query_model" and rest.split(".")[0] in ("text_model", "vision_model"):
            continue  # the towers
        if prefix not in SIDES or (shared and prefix == "passage_model"):
            unknown.append(key)
            continue
        side = SIDES[prefix]
        if rest == "ret_cell.query_state_ids":
            slot_ids[side] = value
            continue
        if rest in buffers:
            continue  # read into the config (read_config)
        try:
            name = cell_key(rest)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            cells[f"{side}.{name}"] = value
    if unknown:
        by_file: dict[Path, list[str]] = {}
        for key in unknown:
            by_file.setdefault(origin[key], []).append(key)
        file, keys = next(iter(by_file.items()))
        raise InputError(file, "weights", f"{len(unknown)} keys the published ReT layout does not have: "
                         f"{', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}")
    if shared:
        cells.update({"passage." + k[len("query."):]: v for k, v in list(cells.items()) if k.startswith("query.")})
        if "query" in slot_ids:
            slot_ids["passage"] = slot_ids["query"]
    return cells, slot_ids


def load_published(name_or_path: str | Path, device: str | torch.device | None = None):
    """A RetrieverModel from a published checkpoint (a folder, or a hub name when the hub is reachable)."""
    from retriever.ret.model import RetrieverModel

    folder = resolve_checkpoint(name_or_path)
    if not is_published_folder(folder):
        raise InputError(folder / CONFIG_FILE, "model_type", "not a published ReT checkpoint (model_type 'retriever')")
    tensors, origin = read_weights(folder)
    raw, config = read_config(folder, tensors)
    shared = bool(raw.get("share_query_passage_models", False))
    cells, slot_ids = split_weights(tensors, origin, shared)
    towers = build_published_towers(folder, raw, tensors, origin)
    model = RetrieverModel(config, towers=towers)
    target = model.cells()
    file = next(iter(origin.values()))
    own = target.state_dict()
    for key, value in cells.items():
        if key in own and own[key].shape != value.shape:
            raise InputError(origin.get(key, file), key, f"shape {tuple(value.shape)}, the config gives "
                             f"{tuple(own[key].shape)}")
    _load_strict(target, cells, file, "cells")
    for side, ids in slot_ids.items():
        buffer = getattr(model, f"{side}_model").cell.slot_ids
        if ids.shape != buffer.shape:
            raise InputError(file, f"{side}_model.ret_cell.query_state_ids", f"shape {tuple(ids.shape)}, expected "
                             f"{tuple(buffer.shape)}")
        buffer.copy_(ids)
    model.eval()
    return model.to(device) if device is not None else model


def load_published_towers(folder: str | Path) -> PublishedTowers:
    """Only the towers of a published checkpoint (for a model trained here on them, which names that folder)."""
    folder = Path(folder)
    if not is_published_folder(folder):
        raise InputError(folder / CONFIG_FILE, "model_type", "not a published ReT checkpoint (model_type 'retriever')")
    tensors, origin = read_weights(folder)
    raw, _ = read_config(folder, tensors)
    return build_published_towers(folder, raw, tensors, origin)
