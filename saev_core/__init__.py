"""saev_core: the library and step scripts the Snakemake workflow calls."""
