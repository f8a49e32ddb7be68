"""dblocks: DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026) in pure PyTorch.

Reading order: noise -> precond -> loss -> sampling -> models.dit -> plan -> trainer
(then build, evaluate, metrics; the other families in models/; worker/ and coordinator/ wrap these).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    BlocksConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    NoiseConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from .build import block_loss, build_block, family, make_trainer, model_plans, plan_for
from .data import BatchStream, ImageSplit, load_digits_split
from .embedding import expected_embedding, fixed_embedding
from .evaluate import chain, evaluate, evaluate_model, generate
from .metrics import DigitsClassifier, frechet_distance, heldout_loss, train_digits_classifier
from .loss import weighted_ce, weighted_l2
from .models.dit import DIT_SIZES, DiTBlock, DiTConfig, dit_config, dit_loss
from .noise import (
    block_range,
    inference_sigmas,
    karras_sigmas,
    partition_sigmas,
    route,
    sample_sigmas,
    truncated_quantile,
    widen_range,
)
from .plan import BlockSpec, make_plan, plan_boundaries, plan_hash
from .precond import denoise, edm_scalings, loss_weight
from .sampling import BlockRouter, classifier_free_guidance, euler_step, sample_euler
from .seeds import block_seed, derive_seed, seeded
from .text import TextSplit, load_text_split
from .trainer import BlockTrainer

__all__ = [name for name in dir() if not name.startswith("_")]
