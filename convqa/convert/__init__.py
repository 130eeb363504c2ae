"""The conversion stage: the built-in converter, its mutants, the converter registry and the runner that executes any converter."""
