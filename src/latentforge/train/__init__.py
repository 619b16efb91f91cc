"""Training: the noise predictor (fine-tuning or from nothing), the VAE, and the demo model recipe."""

from latentforge.train.common import TrainingDiverged
from latentforge.train.config import ConfigError, TrainConfig, load_config


def train(cfg: TrainConfig, progress=None, stop_after: int | None = None):
    """Run a training config (``mode`` "diffusion", "lora", "embedding" or "vae"); returns the output file
    (the model, the kohya LoRA file, or the embedding's ``.safetensors`` beside its ``.pt``). A loss,
    gradient or weight that becomes NaN/Inf stops the run with ``TrainingDiverged`` before anything is
    written."""
    cfg.validate()  # also for configs built in Python rather than read by load_config
    if cfg.mode == "vae":
        from latentforge.train.vae import train_vae

        return train_vae(cfg, progress, stop_after)
    from latentforge.train.diffusion import train_diffusion

    return train_diffusion(cfg, progress, stop_after)


__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "load_config", "train"]
