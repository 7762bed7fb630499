"""Command-line surface of `train_iterative` and `eval_iterative` (the seed's flags), one dataclass each; both take
core.data's DataLoader settings (num_workers, pin_memory, persistent_workers, verify_images)."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.data import LoaderOptions

# Fields that change what a round computes; everything else (paths of outputs, resume switches, logging)
# may differ between a run and its resumption without invalidating cached rounds.
MINING_FIELDS = ("hard_negative_k", "fast_mode", "fast_mode_triplets", "eval_batch_size", "seed")
GENERATION_FIELDS = ("foundation_model_backbone", "augment_per_query", "max_augment_per_round", "max_new_tokens",
                     "num_beams", "do_sample", "max_text_words", "generation_batch_size", "seed")
TRAINING_FIELDS = ("batch_size", "learning_rate", "weight_decay", "epochs_per_round", "warmup_steps",
                   "negatives_per_query", "accumulate_augmented", "fast_mode", "fast_mode_triplets", "seed")
# The qwen2_vl embedder's options (VLM2VecOptions): part of the manifests of qwen2_vl runs only, so adding them left
# every composed_retriever experiment's cached rounds valid. The pixel cap changes every embedding (mining too), the
# LoRA shape what training learns; gradient checkpointing changes memory only, not the numbers, so it is left out.
VLM2VEC_MINING_FIELDS = ("max_pixels",)
VLM2VEC_TRAINING_FIELDS = ("max_pixels", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_dora")

# VLM2Vec's LoRA targets (its ModelArguments.lora_target_modules). On Qwen2-VL the names that exist are the language
# model's q/k/v/o and MLP down projections; the vision tower (qkv, proj, fc1, fc2) stays frozen.
VLM2VEC_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "k_proj", "q_proj", "out_proj", "v_proj")


@dataclass
class VLM2VecOptions:
    """How the qwen2_vl backbone is loaded and trained, as VLM2Vec trains its embedder: LoRA adapters over a frozen
    Qwen2-VL (weights in bf16 on CUDA, core.device), gradient checkpointing, a cap on each image's pixels."""
    # a PEFT LoRA adapter (folder with adapter_config.json + adapter_model.safetensors, or hub name) loaded over
    # model_path as the round-0 model, e.g. model_path Qwen/Qwen2-VL-2B-Instruct + TIGER-Lab/VLM2Vec-Qwen2VL-2B;
    # empty = a fresh adapter of the shape below. Later rounds load their own checkpoint's adapter over the same base.
    model_adapter: str = ""
    # the shape of a fresh adapter (VLM2Vec: r 16, alpha 64, dropout 0.1, DoRA, Gaussian init); an adapter loaded
    # from model_adapter keeps the shape it was saved with
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: list(VLM2VEC_TARGET_MODULES))
    lora_dora: bool = True                  # weight-decomposed LoRA (use_dora), as VLM2Vec trains
    gradient_checkpointing: bool = True     # recompute activations in the backward pass: a 2B VLM's batch fits
    # at most this many pixels per image, passed to the Qwen2-VL processor (each 28x28 block is one image token);
    # VLM2Vec's 28*28*1280. 0 = the processor's saved setting. A trained checkpoint keeps the cap it trained with.
    max_pixels: int = 28 * 28 * 1280


@dataclass
class TrainIterativeConfig(LoaderOptions, VLM2VecOptions):
    # data: the CIRR layout (captions/cap.rc2.{split}.json, image_splits/split.rc2.{split}.json)
    dataset_name: str = "shapes"            # shapes | cirr (both in the CIRR layout); names the experiment folder
    data_dir: str = ""                      # folder holding captions/ and image_splits/
    image_root: str = ""                    # image_splits paths are relative to this folder
    train_split: str = "train"
    val_split: str = "val"                  # picks each round's best epoch
    # the embedding model (round 0 = the model in model_path)
    model_backbone: str = "composed_retriever"   # composed_retriever (Shapes) | qwen2_vl (VLM2Vec-style)
    model_path: str = ""                    # folder (or hub name for qwen2_vl) of the round-0 model
    # (qwen2_vl: the base Qwen2-VL; its adapter, LoRA shape, pixel cap: the VLM2VecOptions fields)
    # composed_retriever: its frozen image encoder's tokens are cached on disk (float16, image_cache/ in the
    # experiment); false = the encoder runs live on every batch (a ViT-g's tokens of CIRR are ~15 GB). Either way
    # the same numbers up to float16 rounding, so it is not part of the rounds' manifests.
    cache_image_tokens: bool = True
    # the foundation model that writes new modification texts
    foundation_model_backbone: str = "mtst"  # mtst | qwen2_vl | llava | scene_reader (Shapes: the scene reader reads both images)
    foundation_model_path: str = ""
    max_new_tokens: int = 24
    num_beams: int = 1
    do_sample: bool = False
    generation_batch_size: int = 32
    max_text_words: int = 30                # longer generated texts are rejected by the filter
    # the loop
    num_iterations: int = 3
    hard_negative_k: int = 5                # wrong candidates kept per query whose target is not top-1
    augment_per_query: int = 1             # hard negatives per query turned into new positives by the foundation model
    max_augment_per_round: int = 0         # cap on generated triplets per round (0 = no cap)
    negatives_per_query: int = 2            # mined hard negatives appended to the loss's targets per original query
    accumulate_augmented: bool = True       # round N trains on the augmented triplets of rounds 1..N
    # training, restarted each round from the previous round's best checkpoint
    batch_size: int = 64                    # global batch (at most this many triplets), split over torchrun's ranks
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs_per_round: int = 2
    warmup_steps: int = 10
    eval_batch_size: int = 256
    checkpoint_every: int = 50              # steps between a round's checkpoint-last/ saves (0 = after each epoch only)
    # outputs and resumption
    experiment_dir: str = ""                # default experiments/{model_backbone}_{dataset_name}_iterative
    auto_resume: bool = False               # continue a killed run: reuse every round whose manifest matches
    resume_from_iteration: int = 0          # N > 0: keep rounds < N as they are on disk, redo rounds >= N
    fast_mode: bool = False                 # a subset of the training triplets, one epoch: for checking
    fast_mode_triplets: int = 256
    seed: int = 0
    wandb: bool = True


@dataclass
class EvalIterativeConfig(LoaderOptions):
    experiment_dir: str = ""                # a train_iterative output folder (its config.yaml names data and model)
    iterations: list[int] = field(default_factory=list)  # e.g. "1,3,5"; empty = every round found, round 0 included
    eval_dataset: str = "test"              # the split to evaluate; CIRR test1 (targets hidden): server files only
    data_dir: str = ""                      # default: the experiment's data_dir
    image_root: str = ""
    eval_batch_size: int = 256
    output_file: str = "evaluation_results.json"  # relative to experiment_dir unless absolute
    summary: str = ""                       # the main job's results.json (rows round0..roundN); empty = none
    summary_stage: str = "cir-iterative"
    seed: int = 0


def mining_fields(cfg: TrainIterativeConfig) -> tuple[str, ...]:
    """The fields a round's mining manifest hashes for this run's backbone."""
    return MINING_FIELDS + (VLM2VEC_MINING_FIELDS if cfg.model_backbone == "qwen2_vl" else ())


def training_fields(cfg: TrainIterativeConfig) -> tuple[str, ...]:
    """The fields a round's training manifest hashes for this run's backbone."""
    return TRAINING_FIELDS + (VLM2VEC_TRAINING_FIELDS if cfg.model_backbone == "qwen2_vl" else ())
