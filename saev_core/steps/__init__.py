"""The steps the workflow's rules run, one module per rule (or pair, for the dump's parts and
publish): `python -m saev_core.steps.<step> --spec-fpath SPEC` plus its output paths and
`--device`. Each reads its job (`saev_core.jobs`) from the spec and shares the library around it;
none imports the planner."""
