"""Training: the noise predictor (fine-tuning or from nothing), the VAE, and the demo model recipe."""

from latentforge.train.common import TrainingDiverged
from latentforge.train.config import ConfigError, TrainConfig, load_config


def train(cfg: TrainConfig, progress=None, stop_after: int | None = None):
    """Run a training config (``mode`` "diffusion", "lora", "embedding" or "vae"); returns the output file
    (the model, the kohya LoRA file, or the embedding's ``.safetensors`` beside its ``.pt``). A loss,
    gradient or weight that becomes NaN/Inf stops the run with ``TrainingDiverged`` before anything is
    written. Under ``torchrun --nproc_per_node N`` the modes other than "vae" train data-parallel on N
    processes (``batch_size`` is the global batch), equal to one process within float tolerance."""
    cfg.validate()  # also for configs built in Python rather than read by load_config
    from latentforge.train import distributed

    ctx = distributed.setup(cfg)  # one process, or this rank of a torchrun run (train/distributed.py)
    if cfg.mode == "vae":  # setup refused it under torchrun
        from latentforge.train.vae import train_vae

        return train_vae(cfg, progress, stop_after)
    from latentforge.train.diffusion import train_diffusion

    ok = False
    try:
        with distributed.quiet_unless_main(ctx):
            result = train_diffusion(cfg, progress if ctx.main else None, stop_after, ctx)
        ok = True
        return result
    finally:
        ctx.close(ok)


__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "load_config", "train"]
