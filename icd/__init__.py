"""The `icd` command: one entry point (icd.cli) for every stage's subcommands."""
