"""dblocks: DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026) in pure PyTorch.

Reading order: noise -> precond -> loss -> sampling -> models.dit -> levels -> plan -> trainer
(then families/ -- each family's loss, inference and metrics behind one interface, DiT's first --,
build, metrics; the other networks in models/; worker/ and coordinator/ wrap these).
"""

from .build import block_from_export, build_block, eval_ranges, make_trainer, model_plans, plan_for
from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    BlocksConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from .data import BatchStream, ImageSplit, load_digits_split
from .embedding import expected_embedding, fixed_embedding
from .families import FAMILIES, Family, get_family
from .families.dit import chain, dit_loss, generate
from .levels import Levels, SigmaLevels, TimeLevels
from .loss import weighted_ce, weighted_l2
from .metrics import ImageClassifier, frechet_distance, heldout_loss, train_classifier
from .models.dit import DIT_SIZES, DiTBlock, DiTConfig, dit_config
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
from .precond import denoise, edm_readout, edm_scalings, loss_weight
from .sampling import BlockRouter, classifier_free_guidance, euler_step, sample_euler
from .seeds import block_seed, derive_seed, seeded
from .text import TextSplit, load_text_split
from .trainer import BlockTrainer

__all__ = [name for name in dir() if not name.startswith("_")]
