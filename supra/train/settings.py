"""The `train:` section of a recipe (`TrainConfig`, its stages each a `StageConfig`) and what the
training loop reads of a recipe (`TrainSettings`). Plain dataclasses: the recipe schema
(supra.config) nests the sections, and the training code takes them as they are; the command layer
(supra.commands.settings) hands each part its own settings, not the whole recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.config import DataConfig


@dataclass
class StageConfig:
    """One uptraining stage: which parameters train, on which loss, for how many tokens."""

    name: str = "full"  # a kind of supra.train.stages.STAGE_KINDS: attention_transfer | lora | full | distill
    tokens: int = 1_000_000  # uptraining tokens of this stage
    lr: float = 3e-5  # peak learning rate (AdamW)
    min_lr: float = 1e-5  # cosine floor
    warmup_steps: int = 100  # linear warmup steps before the cosine decay
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW [beta1, beta2]
    lora_r: int = 8  # lora/distill: adapter rank
    lora_alpha: int = 16  # lora/distill: adapter scale (alpha / r)
    lora_dropout: float = 0.0  # lora/distill: dropout on the adapters' input
    # lora/distill: the modules given adapters
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # attention_transfer only: > 0 trains blocks of this many decoder layers one after another from
    # inputs cached on disk, one block on the accelerator at a time (models that do not fit at once)
    block_layers: int = 0
    # attention_transfer only: > 0 runs the frozen teacher once per this many tokens, keeps each layer's
    # q/k/v and softmax output in memory (cache_dtype) and trains `epochs` passes over them
    cache_tokens: int = 0
    epochs: int = 1  # cache_tokens: passes over each cached chunk
    cache_dtype: str = "bfloat16"  # cache_tokens: dtype of the cached teacher activations
    train: str = "lora"  # distill only: lora | new (feature maps, window factors) | all
    ce_weight: float = 0.0  # distill only: loss = (1 - ce_weight) KL(teacher || model) + ce_weight CE


@dataclass
class TrainConfig:
    # run in order; a stage's keys: train.stages.*
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    batch_tokens: int = 16384  # tokens per optimizer step, all ranks together
    micro_batch_size: int = 1  # rows per forward on one rank; accumulation is derived
    grad_clip: float = 1.0  # gradient norm clipped to this
    checkpoint_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    eval_every: int = 0  # steps between held-out perplexities logged to metrics.jsonl (0: none)
    logger: str = "rich"  # rich | wandb | none
    activation_checkpointing: bool = False  # recompute each layer in the backward: less memory, ~30% slower
    compile: bool = False  # torch.compile the decoder layers
    # Compute dtype on GPU: FSDP2's parameter dtype across processes (reduction in float32), autocast
    # in one process; the weights and optimizer state stay in `dtype`.
    param_dtype: str = "bfloat16"
    eval_baselines: bool = True  # held-out ppl of the original and converted-untrained model first
    sample_tokens: int = 32  # after training: tokens generated from a held-out prompt (0: none)
    dry_run: bool = False  # plan the job (steps, memory, time) on the meta device; train nothing
    world_size: int | None = None  # for dry runs: GPUs to plan for (default: the launcher's)
    gpu_memory_gb: float = 80.0  # for dry runs
    gpu_tflops: float = 989.0  # bf16 dense peak used for MFU and dry-run time (H100 SXM)
    expected_mfu: float = 0.4  # for the dry-run wall-time estimate


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop reads of a recipe besides the model."""

    train: TrainConfig  # the stages, the batch, checkpoints, logging
    data: DataConfig  # the training text
    seq_len: int  # tokens per training row
    dtype: str  # the weights' dtype (a forward computes in train.param_dtype)
    seed: int  # with the chunk and epoch, the micro-batch order of a cached transfer's later epochs
    logged: dict[str, Any]  # the whole recipe, as the run's logger records it (wandb's run config)
