"""saev_core: the library the Snakemake workflow's steps share.

`saev_core.steps` holds the modules the rules run, `saev_core.planning` what turns the config
into their jobs; the modules here are the library both use (typed configs and jobs, shards and
their loaders, datasets, ViTs, SAEs and their checkpoints, concepts, the browser page)."""
