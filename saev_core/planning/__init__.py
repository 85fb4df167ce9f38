"""Planning, run where Snakemake plans and never inside a job: the config becomes typed jobs
(`plan`), readable labels (`labels`), and what reruns them (`reruns`); `config_files` reads the
YAML strictly and checks it from the command line."""
