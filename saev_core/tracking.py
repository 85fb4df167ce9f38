"""Optional Weights & Biases logging of a training job; off unless a sweep sets `wandb_project`.

One W&B run per sweep group (its id is the group id, so a resumed job continues the same run),
with each SAE's log fields under `<sae id>/<field>`. The CSV logs are written either way; W&B
follows its own settings (`WANDB_MODE=offline` works without network, `wandb sync` uploads later).
"""

import logging

logger = logging.getLogger("tracking")


class TrackingError(Exception):
    """W&B logging was asked for but cannot start."""


class WandbRun:
    def __init__(self, project: str, run_id: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise TrackingError(
                f"wandb_project is {project!r} but wandb is not installed: "
                "pip install -e '.[wandb]' (or remove wandb_project from the sweep)"
            ) from None
        self.run = wandb.init(
            project=project, id=run_id, name=run_id, config=config, resume="allow"
        )
        logger.info("logging to W&B project %s, run %s", project, run_id)

    def log(self, step: int, rows: dict[str, dict]):
        """`rows` maps SAE id to that SAE's log fields at `step`."""
        metrics = {
            f"{sae_id}/{field}": value
            for sae_id, row in rows.items()
            for field, value in row.items()
            if field != "step"
        }
        self.run.log(metrics, step=step)

    def finish(self):
        self.run.finish()
