"""Training: the noise predictor (fine-tuning or from nothing), the VAE, and the demo model recipe."""

from latentforge.train.common import TrainingDiverged
from latentforge.train.config import ConfigError, TrainConfig, load_config


def train(cfg: TrainConfig, progress=None, stop_after: int | None = None):
    """Run a training config (``mode`` "diffusion", "lora", "embedding" or "vae"); returns the output file
    (the model, the kohya LoRA file, or the embedding's ``.safetensors`` beside its ``.pt``). A loss,
    gradient or weight that becomes NaN/Inf stops the run with ``TrainingDiverged`` before anything is
    written. Under ``torchrun --nproc_per_node N`` every mode trains data-parallel on N
    processes (``batch_size`` is the global batch), equal to one process within float tolerance."""
    cfg.validate()  # also for configs built in Python rather than read by load_config
    from latentforge.train import distributed

    ctx = distributed.setup(cfg)  # one process, or this rank of a torchrun run (train/distributed.py)
    report = progress if ctx.main else None
    ok = False
    try:
        with distributed.quiet_unless_main(ctx):
            if cfg.mode == "vae":
                from latentforge.train.vae import train_vae

                result = train_vae(cfg, report, stop_after, ctx)
            else:
                from latentforge.train.diffusion import train_diffusion

                result = train_diffusion(cfg, report, stop_after, ctx)
        ok = True
        return result
    finally:
        ctx.close(ok)


__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "load_config", "train"]
